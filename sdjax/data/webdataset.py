"""Webdataset shards read in place: img2dataset's ``.tar`` files, local or in a bucket, nothing copied.

A shard holds samples as consecutive tar members sharing a key (``000010005.jpg``,
``000010005.txt``, ``000010005.json``). Each epoch the sorted file list is permuted by
(seed, epoch) and host i of n reads files[i::n]: ``interleave`` files at once, one sample from
each in turn, through a shuffle window of ``shuffle_buffer`` samples. The stream repeats epoch
after epoch, so every host yields a batch at every step (a host whose files hold fewer samples
starts its next epoch earlier; nothing is padded or dropped).

The reader's position is small and exact: the files open with the byte offset of their next
sample's header, the shuffle window as (file, offset) references and the number of draws made.
A restored reader re-reads the window's samples at their offsets and continues with exactly the
batches the uninterrupted run would have seen. Bad samples (an undecodable image, no image, no
caption, a truncated tar's last member) are skipped, counted per shard and logged.
"""

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from typing import Any

import braceexpand
import grain
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image

from sdjax import paths
from sdjax.data import buckets as buckets_lib

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand(pattern: str) -> list[str]:
    """The sorted files of ``pattern``: a comma-separated list whose entries are brace ranges
    (``/data/{00000..00099}.tar``), globs (``/data/*.tar``) or plain paths, local or ``gs://``."""
    files = []
    for entry in (p.strip() for p in re.split(r",(?![^{]*})", pattern)):  # commas outside braces
        if not entry:
            continue
        try:
            expanded = list(braceexpand.braceexpand(entry))
        except braceexpand.UnbalancedBracesError as e:
            raise ValueError(f"data.files: {e}") from e
        for path in expanded:
            path = paths.check(path, "data.files")
            if glob.has_magic(path):
                matches = paths.glob(path)
                if not matches:
                    raise FileNotFoundError(f"data.files: {path} matches no file.")
                files.extend(matches)
            else:
                files.append(path)
    if not files:
        raise ValueError(f"data.files={pattern!r} names no file: give a brace range, a glob or a comma-separated list "
                         "of .tar shards.")
    compressed = [f for f in files if not f.endswith(".tar")]
    if compressed:
        raise ValueError(f"data.files: {compressed[0]} is not an uncompressed .tar shard (img2dataset's default "
                         "output); the reader resumes at byte offsets, which compressed shards do not have.")
    return sorted(set(files))


def check_files(files: Sequence[str]) -> None:
    """Raises one error naming the missing shards (each folder listed once, not a request per file)."""
    by_dir = collections.defaultdict(list)
    for f in files:
        by_dir[f.rsplit("/", 1)[0]].append(f)
    missing = []
    for folder, names in by_dir.items():
        try:
            present = {p.name for p in epath.Path(folder).iterdir()}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        except Exception as e:  # noqa: BLE001 - a bucket's client raises its own types
            raise OSError(f"data.files: cannot list {folder} ({type(e).__name__}: {e}). Check the path and that "
                          "this host's credentials may read it.") from e
        missing += [n for n in names if n.rsplit("/", 1)[-1] not in present]
    if missing:
        raise FileNotFoundError(f"data.files: {len(missing)} of {len(files)} shards are missing, e.g. "
                                f"{', '.join(missing[:3])}.")


@dataclasses.dataclass(frozen=True)
class Shards:
    """The shards a run reads, listed and checked (nothing is copied or converted)."""
    files: tuple[str, ...]

    @classmethod
    def find(cls, pattern: str) -> "Shards":
        files = expand(pattern)
        check_files(files)
        return cls(tuple(files))

    def describe(self) -> str:
        digest = hashlib.sha256("\n".join(self.files).encode()).hexdigest()[:12]
        return f"webdataset ({len(self.files)} shards, {self.files[0]} .. {self.files[-1]}, list {digest})"


def host_files(files: Sequence[str], seed: int, epoch: int, host: int, hosts: int) -> list[int]:
    """Indices into ``files`` that ``host`` reads in ``epoch``: a (seed, epoch) permutation, every
    ``hosts``-th entry."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(len(files))[host::hosts]]


def _split_key(name: str) -> tuple[str, str]:
    """A member name -> (sample key, extension), as webdataset splits them: at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class _Shard:
    """One open shard, read sample by sample from a byte offset."""

    def __init__(self, path: str, index: int, offset: int):
        self.index, self._base = index, offset
        self.next_offset = offset  # where the next unread sample's first header starts; -1 at the end
        if offset < 0:  # a shard read to its end, kept in the round-robin until its turn comes
            self._file = self._tar = None
            return
        self._file = epath.Path(path).open("rb")
        self._file.seek(offset)
        self._tar = tarfile.open(fileobj=self._file, mode="r|")
        self._members = iter(self._tar)
        self._pending: tuple[tarfile.TarInfo, bytes] | None = None

    def _member(self) -> tuple[tarfile.TarInfo, bytes] | None:
        while True:
            info = next(self._members, None)
            if info is None:
                return None
            if info.isfile():
                return info, self._tar.extractfile(info).read()

    def next_sample(self) -> tuple[int, dict[str, Any]] | None:
        """(offset, {"__key__", ext: bytes}) of the next sample, or None at the end. A truncated
        shard raises ``tarfile.ReadError`` / ``EOFError``; the sample it cut is lost."""
        if self.next_offset < 0:
            return None
        first = self._pending or self._member()
        self._pending = None
        if first is None:
            return None
        offset = self._base + first[0].offset
        key, ext = _split_key(first[0].name)
        sample = {"__key__": key, ext: first[1]}
        while (member := self._member()) is not None:
            k, e = _split_key(member[0].name)
            if k != key:
                self._pending = member
                self.next_offset = self._base + member[0].offset
                return offset, sample
            sample[e] = member[1]
        self.next_offset = -1  # the end
        return offset, sample

    def close(self):
        if self._tar is not None:
            self._tar.close()
            self._file.close()


def read_sample_at(path: str, offset: int) -> dict[str, Any]:
    """The one sample whose first header is at ``offset`` of ``path``."""
    shard = _Shard(path, -1, offset)
    try:
        got = shard.next_sample()
    finally:
        shard.close()
    if got is None:
        raise ValueError(f"{path}: no sample at byte {offset}; the shard changed since the checkpoint was written.")
    return got[1]


@dataclasses.dataclass
class StreamState:
    """Where a host's stream stands. ``open``: [file index, next sample's offset] per open file in
    round-robin order; ``window``: [file index, offset] of the samples in the shuffle window."""
    epoch: int = 0
    next_file: int = 0  # position in the epoch's host file list of the next file to open
    turn: int = 0  # which open file gives the next sample
    open: list = dataclasses.field(default_factory=list)
    window: list = dataclasses.field(default_factory=list)
    draws: int = 0


class SampleStream:
    """This host's raw samples: its files of each epoch, ``interleave`` at a time, through a shuffle
    window, repeating. Deterministic given (files, seed, host, hosts) and its ``state``."""

    def __init__(self, files: Sequence[str], seed: int, host: int, hosts: int, interleave: int, shuffle_buffer: int,
                 on_skip: Callable[[str, str, str], None], state: StreamState | None = None):
        if len(files) < hosts:
            raise ValueError(f"data.files has {len(files)} shards for {hosts} hosts: every host reads whole shards, "
                             "so give at least one shard per host (split the shards, or use fewer hosts).")
        self._files, self._seed, self._host, self._hosts = list(files), seed, host, hosts
        self._interleave, self._window_size, self._on_skip = interleave, max(shuffle_buffer, 1), on_skip
        self.state = state or StreamState()
        self._shards: list[_Shard] = []
        self._window: list[dict] = []
        self._restore()

    def _epoch_files(self, epoch: int) -> list[int]:
        return host_files(self._files, self._seed, epoch, self._host, self._hosts)

    def _restore(self):
        s = self.state
        self._shards = [_Shard(self._files[i], i, off) for i, off in s.open]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            self._window = list(pool.map(lambda ref: dict(read_sample_at(self._files[ref[0]], ref[1]),
                                                          __url__=self._files[ref[0]]), s.window))

    def _open_next(self) -> bool:
        """Opens the epoch's next file (the next epoch's first once this one's are all open)."""
        s = self.state
        order = self._epoch_files(s.epoch)
        if s.next_file >= len(order):
            if self._shards:
                return False  # this epoch's last files are still being read
            s.epoch, s.next_file = s.epoch + 1, 0
            order = self._epoch_files(s.epoch)
        i = order[s.next_file]
        s.next_file += 1
        self._shards.append(_Shard(self._files[i], i, 0))
        return True

    def _next_raw(self) -> tuple[list, dict]:
        """The next sample of the interleaved files (opening and closing files as they end)."""
        s, empty_passes = self.state, 0
        while True:
            while len(self._shards) < self._interleave and self._open_next():
                pass
            if not self._shards:
                continue
            s.turn %= len(self._shards)
            shard = self._shards[s.turn]
            path = self._files[shard.index]
            try:
                got = shard.next_sample()
            except (tarfile.ReadError, EOFError, OSError) as e:
                self._on_skip(path, "?", f"truncated or corrupt shard, rest of the file skipped ({e})")
                got = None
            if got is None:
                shard.close()
                self._shards.pop(s.turn)
                empty_passes += 1
                if empty_passes > 2 * len(self._files) + self._interleave:
                    raise ValueError(f"data.files: host {self._host}'s shards hold no sample.")
                continue
            s.turn += 1
            return [shard.index, got[0]], dict(got[1], __url__=path)

    def _sync_open(self):
        self.state.open = [[sh.index, sh.next_offset] for sh in self._shards]

    def __next__(self) -> dict:
        s = self.state
        while len(self._window) < self._window_size:
            ref, sample = self._next_raw()
            s.window.append(ref)
            self._window.append(sample)
        j = int(np.random.default_rng([self._seed, self._host, s.draws]).integers(len(self._window)))
        s.draws += 1
        sample = dict(self._window[j], __ref__=s.window[j])
        self._window[j], s.window[j] = self._window[-1], s.window[-1]
        self._window.pop()
        s.window.pop()
        self._sync_open()
        return sample

    def close(self):
        for shard in self._shards:
            shard.close()
        self._shards = []


def decode(sample: dict, caption_ext: str) -> tuple[np.ndarray, str, tuple[int, int]]:
    """(uint8 RGB image, caption, original (height, width)) of a raw sample. Raises ``ValueError``
    naming what is wrong (no image, no caption, undecodable image)."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError("no image member")
    caption = sample.get(caption_ext, b"").decode("utf-8", errors="replace").strip()
    if not caption:
        raise ValueError("no caption")
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            image = np.asarray(img.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types on bad files
        raise ValueError(f"undecodable image ({type(e).__name__})") from e
    size = image.shape[:2]
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            size = (int(meta["original_height"]), int(meta["original_width"]))
        except (ValueError, KeyError, TypeError):
            pass  # the decoded size stands in
    return image, caption, size


def decode_moments(sample: dict, ext: str, caption_ext: str) -> tuple[np.ndarray, str, tuple[int, int]]:
    """(f32 moments (h, w, 2C), caption, latent (h, w)) of a precomputed-latent sample: an .npy of
    (2C, h, w), channels first as MLPerf's shards and ``sdjax-train encode`` write them (the mean's C
    channels, then the log-variance's); raises ``ValueError`` naming what is wrong."""
    if ext not in sample:
        raise ValueError(f"no .{ext} member")
    caption = sample.get(caption_ext, b"").decode("utf-8", errors="replace").strip()
    if not caption:
        raise ValueError("no caption")
    try:
        moments = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"unreadable .{ext} ({e})") from e
    if moments.ndim != 3 or moments.shape[0] % 2:
        raise ValueError(f".{ext} of shape {moments.shape}: expected moments (2C, h, w)")
    moments = np.ascontiguousarray(np.transpose(moments, (1, 2, 0)), np.float32)
    return moments, caption, moments.shape[:2]


class WebDatasetIterator(grain.DatasetIterator):
    """This host's batches of decoded, preprocessed samples, with an exact ``get_state``/``set_state``.

    ``transform(image uint8, caption, original_size, rng, size) -> example dict`` (``size``: the
    bucket's (height, width), or None for the configured square); images decode on a thread pool,
    in stream order, so the batches do not depend on the pool. With ``config.buckets`` decoded
    samples wait in their bucket's queue until a step draws it (``sdjax.data.buckets``)."""

    def __init__(self, files: Sequence[str], config: Any, transform: Callable[..., dict], host: int, hosts: int):
        super().__init__()
        self._files, self._config, self._transform = list(files), config, transform
        self._host, self._hosts = host, hosts
        self.skipped: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._logged: set[tuple[str, str]] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(config.num_threads, 1))
        self._buckets = buckets_lib.parse(config.buckets, config.image_size)
        self._examples = 0  # samples decoded so far: keys each example's preprocessing rng
        self._steps = 0  # batches made: keys each step's bucket draw
        self._stream: SampleStream | None = None
        self._state = StreamState()
        self._queued: list = []  # per bucket: [ref, index] of decoded samples waiting (in the state)
        self._queues: list[list[tuple]] | None = None  # per bucket: (ref, index, image, caption, size)

    def _on_skip(self, path: str, key: str, reason: str):
        """Counts a skipped sample; logs it the first time (later epochs meet it again)."""
        self.skipped[path][reason.split(" (")[0]] += 1
        if (path, key) not in self._logged:
            self._logged.add((path, key))
            print(f"webdataset: skipped {os.path.basename(path)}:{key}: {reason}", flush=True)

    @property
    def stream(self) -> SampleStream:
        if self._stream is None:
            c = self._config
            self._stream = SampleStream(self._files, c.seed, self._host, self._hosts, c.interleave, c.shuffle_buffer,
                                        self._on_skip, StreamState(**dataclasses.asdict(self._state)))
        return self._stream

    def _decode(self, sample: dict, index: int) -> tuple | None:
        try:
            if self._config.moments_ext:
                image, caption, size = decode_moments(sample, self._config.moments_ext, self._config.caption_ext)
            else:
                image, caption, size = decode(sample, self._config.caption_ext)
        except ValueError as e:
            self._on_skip(sample["__url__"], sample["__key__"], str(e))
            return None
        return sample["__ref__"], index, image, caption, size

    def _decoded(self, n: int) -> list[tuple]:
        """The next ``n`` samples of the stream, decoded (bad ones skipped: possibly fewer)."""
        samples = [next(self.stream) for _ in range(n)]
        first = self._examples
        self._examples += n
        return [d for d in self._pool.map(self._decode, samples, range(first, first + n)) if d]

    def _example(self, item: tuple, size: tuple[int, int] | None) -> dict:
        _, index, image, caption, original = item
        return self._transform(image, caption, original, np.random.default_rng([self._config.seed, self._host, index]),
                               size)

    def _take(self) -> tuple[list[tuple], tuple[int, int] | None]:
        """This step's decoded samples and their size."""
        b = self._config.batch_size
        if self._buckets is None:
            out = []
            while len(out) < b:
                out += self._decoded(b - len(out))
            return out, None
        queues = self._restored_queues()
        while sum(map(len, queues)) < 2 * b:  # a look-ahead, so every bucket can be drawn
            self._queue(self._decoded(b))
        waiting = np.asarray([len(q) for q in queues], np.int64)
        if jax.process_count() > 1:  # every host draws the same bucket from the pod's queues
            waiting = np.asarray(multihost_utils.process_allgather(waiting)).reshape(-1, len(queues)).sum(0)
        k = buckets_lib.draw(self._config.seed, self._steps, waiting)
        while len(queues[k]) < b:
            self._queue(self._decoded(b - len(queues[k])))
        out, queues[k][:] = queues[k][:b], queues[k][b:]
        return out, self._buckets[k]

    def _queue(self, items: list[tuple]) -> None:
        for item in items:
            h, w = item[2].shape[:2]
            self._queues[buckets_lib.nearest(self._buckets, h, w)].append(item)

    def _restored_queues(self) -> list[list[tuple]]:
        """The bucket queues, re-read and re-decoded from their references after ``set_state``."""
        if self._queues is None:
            self._queues = [[] for _ in self._buckets]
            refs = [(k, ref, index) for k, entries in enumerate(self._queued) for ref, index in entries]

            def reread(entry):
                k, (i, offset), index = entry
                sample = dict(read_sample_at(self._files[i], offset), __url__=self._files[i], __ref__=[i, offset])
                return k, self._decode(sample, index)

            for k, item in self._pool.map(reread, refs):
                self._queues[k].append(item)
        return self._queues

    def __next__(self) -> dict:
        items, size = self._take()
        self._steps += 1
        out = list(self._pool.map(self._example, items, [size] * len(items)))
        self._state = dataclasses.replace(self.stream.state, open=list(self.stream.state.open),
                                          window=list(self.stream.state.window))
        if self._queues is not None:
            self._queued = [[[item[0], item[1]] for item in q] for q in self._queues]
        return {k: np.stack([e[k] for e in out]) for k in out[0]}

    def get_state(self) -> dict:
        return {"files": len(self._files), "hosts": self._hosts, "examples": self._examples, "steps": self._steps,
                "queued": self._queued, **dataclasses.asdict(self._state)}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        files, hosts = state.pop("files"), state.pop("hosts")
        if (files, hosts) != (len(self._files), self._hosts):
            raise ValueError(f"The checkpoint's data position is for {files} shards over {hosts} hosts; this run has "
                             f"{len(self._files)} over {self._hosts}. Resume with the same data.files and host count.")
        self._examples, self._steps = int(state.pop("examples")), int(state.pop("steps"))
        self._queued = state.pop("queued")
        if self._buckets is not None and len(self._queued) not in (0, len(self._buckets)):
            raise ValueError(f"The checkpoint's data position has {len(self._queued)} buckets; data.buckets gives "
                             f"{len(self._buckets)}. Resume with the same data.buckets.")
        self._queued = self._queued or ([[] for _ in self._buckets] if self._buckets else [])
        self._queues = None
        self._state = StreamState(**state)
        self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
