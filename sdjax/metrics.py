"""Training metrics: TensorBoard event files, a JSONL log and a console progress line.

TensorBoard files are written by a ~40-line encoder of the event-file format (length,
masked CRC32C, serialized ``Event`` proto) so that neither TensorFlow nor tensorboardX is
needed; ``tensorboard --logdir WORKDIR/tb`` reads them. Only process 0 writes.
"""

import io
import json
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping

import numpy as np
from PIL import Image

from sdjax import paths


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire)
    if wire == 2:  # length-delimited
        return key + _varint(len(payload)) + payload
    return key + payload


def _event(step: int, wall_time: float, *, summary_values: list[bytes] = (), file_version: str | None = None) -> bytes:
    """tensorflow.Event: wall_time=1 (double), step=2 (int64), file_version=3, summary=5."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if summary_values:
        out += _field(5, 2, b"".join(_field(1, 2, v) for v in summary_values))
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    """Summary.Value: tag=1, simple_value=2 (float)."""
    return _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value))


def _image_value(tag: str, image_HWC: np.ndarray) -> bytes:
    """Summary.Value with image=4: Summary.Image(height=1, width=2, colorspace=3, encoded_image_string=4)."""
    buf = io.BytesIO()
    Image.fromarray(image_HWC).save(buf, format="PNG")
    h, w, c = image_HWC.shape
    img = _field(1, 0, _varint(h)) + _field(2, 0, _varint(w)) + _field(3, 0, _varint(c)) + _field(4, 2, buf.getvalue())
    return _field(1, 2, tag.encode()) + _field(4, 2, img)


class EventFileWriter:
    """Appends TensorBoard events to ``logdir/events.out.tfevents.<time>.<host>``."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._write(_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._write(_event(step, time.time(), summary_values=[_scalar_value(k, float(v)) for k, v in values.items()]))
        self._f.flush()

    def image(self, step: int, tag: str, image_HWC: np.ndarray) -> None:
        self._write(_event(step, time.time(), summary_values=[_image_value(tag, image_HWC)]))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    """Scalars to ``workdir/tb`` and ``workdir/metrics.jsonl``, images to ``workdir/samples``, and
    a console line ``step 120/1000 | loss 0.1234 | 3.2 steps/s | ETA 0:04:35``.

    ``enabled=False`` (non-zero processes) turns every call into a no-op. A ``gs://`` workdir is
    written through a local mirror (``paths.mirror``) uploaded at most every ``UPLOAD_EVERY`` seconds
    and on ``close``; an earlier run's metrics.jsonl is fetched first and continued.
    """

    UPLOAD_EVERY = 60.0

    def __init__(self, workdir: str, total_steps: int, enabled: bool = True, stream=sys.stdout):
        self.total_steps, self.enabled, self.stream = total_steps, enabled, stream
        self.remote = workdir if paths.is_remote(workdir) else None
        self.workdir = paths.mirror(workdir) if self.remote else workdir
        self._tb = self._jsonl = None
        self._written: set[str] = set()
        self._uploaded = time.monotonic()
        if not enabled:
            return
        if self.remote and paths.exists(f"{self.remote}/metrics.jsonl"):
            paths.readable(f"{self.remote}/metrics.jsonl", "metrics")  # into the mirror, to append to
        self._tb = EventFileWriter(os.path.join(self.workdir, "tb"))
        self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a")
        self._written |= {self._tb.path, self._jsonl.name}

    def _upload(self, force: bool = False) -> None:
        if self.remote and (force or time.monotonic() - self._uploaded > self.UPLOAD_EVERY):
            for local in sorted(self._written):
                paths.upload(local, f"{self.remote}/{os.path.relpath(local, self.workdir)}")
            self._uploaded = time.monotonic()

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        self._tb.scalars(step, values)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        self._upload()

    def progress(self, step: int, loss: float, steps_per_sec: float) -> None:
        if not self.enabled:
            return
        eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
        eta_s = _format_duration(eta) if np.isfinite(eta) else "?"
        print(f"step {step}/{self.total_steps} | loss {loss:.4f} | {steps_per_sec:.2f} steps/s | ETA {eta_s}",
              file=self.stream, flush=True)

    def image(self, step: int, tag: str, image_HWC: np.ndarray) -> str | None:
        """Writes a uint8 image to TensorBoard and ``samples/<tag>_<step>.png``; returns the PNG path."""
        if not self.enabled:
            return None
        self._tb.image(step, tag, image_HWC)
        path = os.path.join(self.workdir, "samples", f"{tag}_{step:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image_HWC).save(path)
        self._written.add(path)
        self._upload(force=True)
        return path

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self._upload(force=True)
