"""Cached latents: a dataset encoded once by a frozen autoencoder, then read as batches.

A cache is a folder of chunks, each ``CHUNK`` consecutive examples of the (unshuffled) dataset:
``moments-NNNNNN.npy`` (f32 (n, h, w, 2C): the posterior's mean and log-variance, so training
still samples a fresh latent each step) and ``input_ids-NNNNNN.npy`` (i32 (n, L)) (SDXL also
caches ``input_ids_2`` and its micro-conditioning's ``original_size`` and ``crop_top_left``; with
``train.cache_text`` the text encoders' outputs ``text_embeds`` (f32 (n, L, D)) and, for SDXL,
``pooled_embeds`` (f32 (n, P)) replace the ids), beside a ``meta.json`` whose fingerprint
(autoencoder, data config, tokenizers, text encoders when their outputs are cached) and array names
say what they were made from. A cache whose fingerprint or arrays differ is rebuilt, never reused.

Encoding writes one chunk at a time (host memory stays at one chunk whatever the dataset's
size), each into a temporary file renamed when complete, so a run killed while encoding resumes
at the first missing chunk. When every host sees the cache folder, host i encodes chunks i, i+n,
...; otherwise each host encodes the whole dataset into its own folder. Training reads the
chunks memory-mapped, in global batches like images (``sdjax.data.global_batches``).
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from sdjax import paths
from sdjax.data.pipeline import DataConfig, global_batches, preprocess

CHUNK = 256
EXAMPLE_ARRAYS = ("input_ids",)  # cached beside the moments unless told otherwise
_META = "meta.json"


def _chunk_path(path: str, name: str, chunk: int) -> str:
    return os.path.join(path, f"{name}-{chunk:06d}.npy")


class ChunkSource:
    """A grain random-access source over a cache's chunks (memory-mapped .npy files)."""

    def __init__(self, path: str, num_examples: int, arrays: tuple[str, ...]):
        self._path, self._len, self._arrays = path, num_examples, arrays
        self._open: dict[tuple[str, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self._len

    def _array(self, name: str, chunk: int) -> np.ndarray:
        key = (name, chunk)
        if key not in self._open:
            self._open[key] = np.load(_chunk_path(self._path, name, chunk), mmap_mode="r")
        return self._open[key]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        chunk, row = divmod(int(i), CHUNK)
        return {k: np.asarray(self._array(k, chunk)[row]) for k in self._arrays}

    def __getstate__(self):  # grain may pickle sources into worker processes: reopen there
        return {"_path": self._path, "_len": self._len, "_arrays": self._arrays, "_open": {}}


def _meta(path: str) -> dict | None:
    try:
        with open(os.path.join(path, _META)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _arrays(example_arrays: tuple[str, ...]) -> tuple[str, ...]:
    return ("moments",) + tuple(example_arrays)


def _missing_chunks(path: str, num_chunks: int, arrays: tuple[str, ...]) -> list[int]:
    return [c for c in range(num_chunks)
            if not all(os.path.isfile(_chunk_path(path, k, c)) for k in arrays)]


def _stale(meta: dict | None, fingerprint: dict, example_arrays: tuple[str, ...]) -> bool:
    return (meta is None or meta.get("fingerprint") != json.loads(json.dumps(fingerprint))
            or tuple(meta.get("arrays", EXAMPLE_ARRAYS)) != tuple(example_arrays))


def read(path: str, fingerprint: dict, example_arrays: tuple[str, ...] = EXAMPLE_ARRAYS) -> ChunkSource | None:
    """The complete cache at ``path`` made from ``fingerprint`` with ``example_arrays`` beside the
    moments, or None (absent, stale or partial)."""
    meta = _meta(path)
    if _stale(meta, fingerprint, example_arrays):
        return None
    n = meta["examples"]
    if _missing_chunks(path, -(-n // CHUNK), _arrays(example_arrays)):
        return None
    return ChunkSource(path, n, _arrays(example_arrays))


def _write_chunk(path: str, chunk: int, arrays: dict[str, np.ndarray]) -> None:
    for k in arrays:
        final = _chunk_path(path, k, chunk)
        tmp = f"{final[:-4]}.tmp-{os.getpid()}.npy"
        np.save(tmp, np.asarray(arrays[k]))
        os.replace(tmp, final)


def _all_hosts_see(path: str) -> bool:
    """Whether the folder host 0 created is visible to every host (a shared file system)."""
    token = f"{time.time_ns()}"
    probe = os.path.join(path, ".host0")
    if jax.process_index() == 0:
        with open(probe, "w") as f:
            f.write(token)
    token = multihost_utils.broadcast_one_to_all(np.frombuffer(token.encode().ljust(32), np.uint8))
    try:
        with open(probe) as f:
            sees = f.read().encode().ljust(32) == bytes(np.asarray(token))
    except FileNotFoundError:
        sees = False
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([sees]))).all())


def _start(path: str, fingerprint: dict, num_examples: int, example_arrays: tuple[str, ...]) -> None:
    """An empty cache folder (replacing a stale one) with the fingerprint of what it will hold."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    with open(os.path.join(path, _META), "w") as f:
        json.dump({"fingerprint": fingerprint, "examples": num_examples, "chunk": CHUNK,
                   "arrays": list(example_arrays)}, f, indent=1)


def _build_in_bucket(path: str, fingerprint: dict, num_examples: int, encode_chunk: Callable[[int], dict],
                     what: str, example_arrays: tuple[str, ...]) -> ChunkSource:
    """``build`` for a ``gs://`` cache: every host sees the bucket, so host i encodes the missing chunks
    i, i+n, ... into its local mirror and uploads each; then every host copies the whole cache into its
    mirror (``paths.readable``) and reads it memory-mapped from there."""
    remote_meta = f"{path}/{_META}"
    meta = _meta(os.path.dirname(paths.readable(remote_meta, "latent cache"))) if paths.exists(remote_meta) else None
    stale = _stale(meta, fingerprint, example_arrays)
    local = paths.mirror(path)
    # processes sharing a machine share the mirror: host 0 clears it only after every host read the old meta
    multihost_utils.sync_global_devices("sdjax latent cache checked")
    if jax.process_index() == 0 and stale:
        if paths.exists(path):
            paths.remove(path)
        _start(local, fingerprint, num_examples, example_arrays)
        paths.upload(os.path.join(local, _META), remote_meta)
    multihost_utils.sync_global_devices("sdjax latent cache created")
    num_chunks = -(-num_examples // CHUNK)
    present = {os.path.basename(p) for p in paths.glob(f"{path}/*.npy")}
    missing = [c for c in range(num_chunks)
               if not all(os.path.basename(_chunk_path("", k, c)) in present for k in _arrays(example_arrays))]
    mine = [c for c in missing if c % jax.process_count() == jax.process_index()]
    if mine:
        print(f"caching latents of {what}: {len(mine)} of {num_chunks} chunks into {path}", flush=True)
    os.makedirs(local, exist_ok=True)
    for c in mine:
        _write_chunk(local, c, encode_chunk(c))
        for k in _arrays(example_arrays):  # the chunk's arrays go up whole; the .npy suffix last marks a chunk complete
            paths.upload(_chunk_path(local, k, c), _chunk_path(path, k, c))
        print(f"  encoded chunk {c + 1}/{num_chunks}", flush=True)
    multihost_utils.sync_global_devices("sdjax latent cache written")
    source = read(paths.readable(path, "latent cache"), fingerprint, example_arrays)
    if source is None:
        raise ValueError(f"The latent cache {path} is incomplete after encoding: is the bucket writable by every "
                         "host?")
    print(f"training on {len(source)} cached latents from {path}", flush=True)
    return source


def build(path: str, fingerprint: dict, num_examples: int, examples: Callable[[int, int], dict[str, np.ndarray]],
          encode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], batch_size: int, what: str,
          example_arrays: tuple[str, ...] = EXAMPLE_ARRAYS) -> ChunkSource:
    """The cache at ``path`` (local or ``gs://``); encodes what is missing first (all of it when absent
    or stale).

    ``examples(start, stop)`` -> {"image" (n, H, W, 3) in [-1, 1], "input_ids" (n, L), ...} of the
    unshuffled dataset; ``encode(a batch_size slice of those)`` -> {"moments", and any of
    ``example_arrays`` it computes (e.g. "text_embeds")}: the last, shorter batch of a chunk is padded
    (repeating its last example) so that ``encode`` sees one shape. The cache keeps the moments and
    ``example_arrays``, each from ``encode`` or else from the examples. Every host calls this.
    """
    def encode_chunk(c: int) -> dict[str, np.ndarray]:
        start, stop = c * CHUNK, min((c + 1) * CHUNK, num_examples)
        chunk = examples(start, stop)
        parts = []
        for i in range(0, stop - start, batch_size):
            n = min(batch_size, stop - start - i)
            padded = {k: np.concatenate([v[i:i + n]] + [v[i + n - 1:i + n]] * (batch_size - n))
                      for k, v in chunk.items()}
            parts.append({k: np.asarray(v)[:n] for k, v in encode(padded).items()})
        encoded = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return {k: encoded[k] if k in encoded else chunk[k] for k in _arrays(example_arrays)}

    if paths.is_remote(path):
        return _build_in_bucket(path, fingerprint, num_examples, encode_chunk, what, example_arrays)
    stale = _stale(_meta(path), fingerprint, example_arrays)
    if jax.process_index() == 0 and stale:
        _start(path, fingerprint, num_examples, example_arrays)
    multihost_utils.sync_global_devices("sdjax latent cache created")
    shared = _all_hosts_see(path)
    if not shared and jax.process_index() != 0 and stale:  # this host's own folder
        _start(path, fingerprint, num_examples, example_arrays)
    num_chunks = -(-num_examples // CHUNK)
    mine = [c for c in _missing_chunks(path, num_chunks, _arrays(example_arrays))
            if not shared or c % jax.process_count() == jax.process_index()]
    if mine:
        split = "this host's share of " if shared and jax.process_count() > 1 else ""
        print(f"caching latents of {what}: {split}{len(mine)} of {num_chunks} chunks into {path}"
              + ("" if shared else " (the folder is not shared between hosts: each host encodes all of it)"),
              flush=True)
    t0, done = time.perf_counter(), 0
    for c in mine:
        _write_chunk(path, c, encode_chunk(c))
        done += min((c + 1) * CHUNK, num_examples) - c * CHUNK
        print(f"  encoded {done} images ({done / (time.perf_counter() - t0):.0f} images/s), "
              f"chunk {c + 1}/{num_chunks}", flush=True)
    multihost_utils.sync_global_devices("sdjax latent cache written")
    source = read(path, fingerprint, example_arrays)
    if source is None:
        raise ValueError(f"The latent cache {path} is incomplete after encoding (chunks "
                         f"{_missing_chunks(path, num_chunks, _arrays(example_arrays))[:5]} missing): "
                         "is the folder writable on every host?")
    print(f"training on {len(source)} cached latents from {path}", flush=True)
    return source


def _sha256(params: Any) -> str:
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()


def fingerprint(config: DataConfig, vae_params: Any, vocab: dict[str, int], seq_len: int,
                vocab_2: dict[str, int] | None = None, text_params: Any = None) -> dict:
    """What a cache of ``config``'s data depends on: the data read (not how it is batched or shuffled),
    the autoencoder's weights, the tokenizer's vocabulary (and SDXL's second's), the token sequence
    length and, when the text encoders' outputs are cached, their weights and compute dtype
    (``text_params``: {"params": host arrays, "dtype": name}). ``vae_params``: replicated (or host) arrays."""
    vae_params = jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, vae_params)
    skip = ("batch_size", "num_threads", "num_workers", "shuffle", "num_epochs", "shard_index", "shard_count")
    data = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
    vocab_json = json.dumps(sorted(vocab.items())).encode()
    out = {"data": data, "vae_sha256": _sha256(vae_params), "vocab_sha256": hashlib.sha256(vocab_json).hexdigest(),
           "seq_len": seq_len}
    if vocab_2 is not None:
        out["vocab_2_sha256"] = hashlib.sha256(json.dumps(sorted(vocab_2.items())).encode()).hexdigest()
    if text_params is not None:
        out["text_encoders_sha256"], out["text_dtype"] = _sha256(text_params["params"]), text_params["dtype"]
    return out


def encode_dataset(path: str, config: DataConfig, source: Any, tokenize: Callable[[str], Any],
                   encode: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], fingerprint: dict,
                   example_arrays: tuple[str, ...] = EXAMPLE_ARRAYS) -> ChunkSource:
    """The cache of ``source`` (``config``'s split, read in order) at ``path``, encoding what is missing
    first (``build``), with each example's ``example_arrays`` (its ids, or the text encoders' outputs;
    SDXL's micro-conditioning) beside the moments. ``encode`` maps a batch of examples {"image" (n, H,
    W, 3), "input_ids" (n, L), ...} to {"moments" (n, h, w, 2C), and the example arrays it computes}. A
    dataset with several captions per image caches one of them, drawn by a generator fixed per example."""
    prepare_example = functools.partial(preprocess, config=config, tokenize=tokenize)

    def examples(start: int, stop: int) -> dict[str, np.ndarray]:
        rows = [prepare_example(source[i], np.random.default_rng([config.seed, i])) for i in range(start, stop)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    return build(path, fingerprint, len(source), examples, encode=encode, batch_size=config.batch_size,
                 what=f"{config.name}[{config.split}]", example_arrays=example_arrays)


def make_dataset(source: ChunkSource, config: DataConfig) -> grain.DatasetIterator:
    """Batches {"moments", "input_ids", ...} of the cache, in global batches shuffled by ``config.seed``
    and repeated, checkpointable like ``sdjax.data.make_dataset``'s iterator."""
    if len(source) < config.batch_size * config.shard()[1]:
        raise ValueError(f"The latent cache holds {len(source)} examples, fewer than the global batch of "
                         f"{config.batch_size * config.shard()[1]}; use a bigger dataset or a smaller "
                         "train.batch_size.")
    return global_batches(grain.MapDataset.source(source), config)
