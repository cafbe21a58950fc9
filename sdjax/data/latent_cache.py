"""Cached latents: a dataset encoded once by a frozen autoencoder, then read as batches.

A cache is a folder holding ``moments.npy`` (f32 (N, h, w, 2C): the posterior's mean and
log-variance, so training still samples a fresh latent each step), ``input_ids.npy`` (i32
(N, L)) and ``meta.json``, whose fingerprint (autoencoder, data config, tokenizer) says what
the arrays were made from. A cache whose fingerprint differs is rebuilt, never reused.
Files are written into a temporary folder and renamed, so a killed run leaves no half cache.
"""

import json
import os
import shutil
import time
from typing import Callable, Iterable

import grain
import numpy as np

_ARRAYS = ("moments", "input_ids")


class ArraySource:
    """A grain random-access source over equally long arrays (memory-mapped .npy files)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"Cached arrays differ in length: { {k: len(a) for k, a in arrays.items()} }.")
        self._arrays = arrays
        self._len = lengths.pop()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: np.asarray(a[i]) for k, a in self._arrays.items()}


def read(path: str, fingerprint: dict) -> dict[str, np.ndarray] | None:
    """The cache's arrays (memory-mapped), or None when absent or made from something else."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    if meta.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    return {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r") for k in _ARRAYS}


def write(path: str, arrays: dict[str, np.ndarray], fingerprint: dict) -> None:
    """Writes a cache atomically: the folder appears complete or not at all."""
    missing = set(_ARRAYS) - set(arrays)
    if missing:
        raise ValueError(f"A latent cache needs arrays {sorted(missing)}.")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for k in _ARRAYS:
        np.save(os.path.join(tmp, f"{k}.npy"), np.asarray(arrays[k]))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"fingerprint": fingerprint, "examples": len(arrays["moments"])}, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def encode_all(batches: Iterable[dict[str, np.ndarray]], encode: Callable[[np.ndarray], np.ndarray],
               batch_size: int) -> dict[str, np.ndarray]:
    """Posterior moments (``encode``: images -> (B, h, w, 2C)) and token ids of every example of
    ``batches`` ({"image", "input_ids"}); the last, shorter batch is padded to ``batch_size`` so
    that ``encode`` sees one shape."""
    moments, ids = [], []
    done, t0 = 0, time.perf_counter()
    for batch in batches:
        n = len(batch["image"])
        images = np.zeros((batch_size,) + batch["image"].shape[1:], np.float32)
        images[:n] = batch["image"]
        moments.append(np.asarray(encode(images))[:n])
        ids.append(batch["input_ids"])
        done += n
        if len(moments) % 50 == 0:
            print(f"  encoded {done} images ({done / (time.perf_counter() - t0):.0f} images/s)", flush=True)
    if not moments:
        raise ValueError("The dataset has no examples to cache.")
    return {"moments": np.concatenate(moments), "input_ids": np.concatenate(ids)}


def load_or_build(path: str, fingerprint: dict, batches: Callable[[], Iterable[dict[str, np.ndarray]]],
                  encode: Callable[[np.ndarray], np.ndarray], batch_size: int, what: str) -> dict[str, np.ndarray]:
    """The cache at ``path``; encodes one pass of ``batches()`` with ``encode`` into it first when it
    is absent or was made from something else (``fingerprint``)."""
    arrays = read(path, fingerprint)
    if arrays is None:
        print(f"caching latents of {what} in {path}", flush=True)
        write(path, encode_all(batches(), encode, batch_size), fingerprint)
        arrays = read(path, fingerprint)
    print(f"training on {len(arrays['moments'])} cached latents from {path}", flush=True)
    return arrays


def make_dataset(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
                 shuffle: bool = True) -> grain.DatasetIterator:
    """Batches {"moments", "input_ids"} of one host's cache, shuffled by ``seed``, repeating
    forever; checkpointable like ``sdjax.data.make_dataset``'s iterator."""
    source = ArraySource(arrays)
    if len(source) < batch_size:
        raise ValueError(f"The latent cache holds {len(source)} examples, fewer than the per-host batch of "
                         f"{batch_size}; use a bigger dataset or a smaller train.batch_size.")
    ds = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(None).to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * batch_size))
    return iter(ds.batch(batch_size, drop_remainder=True))
