"""Webdataset shards of images -> shards of latents, in MLPerf's layout: per sample ``KEY.npy`` (the
frozen autoencoder's moments, f32 (2C, h, w): the mean's channels, then the log-variance's) and
``KEY.txt`` (the caption), plus ``KEY.json`` when the input has one. Training reads them with
``data.moments_ext=npy``, drawing a fresh latent from the moments each step.

One output shard per input shard, under the same name. Host i of n encodes the input shards
[i::n], all hosts at once; a finished output shard is written whole (a local temporary file
renamed, or one upload), so an interrupted run re-run with the same command skips the shards
already done. Images are centre-cropped squares of ``data.image_size``; bad samples are skipped
and counted as in training.
"""

import io
import json
import os
import tarfile
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import paths
from sdjax.data import webdataset
from sdjax.data.pipeline import crop_image


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_shard(path: str, out: str, config: Any, encode: Callable[[np.ndarray], np.ndarray],
                 on_skip: Callable[[str, str, str], None]) -> int:
    """Encodes one input shard into ``out``; returns the number of samples written."""
    shard, pending, written = webdataset._Shard(path, 0, 0), [], 0
    local = tempfile.NamedTemporaryFile(suffix=".tar", delete=False).name
    try:
        with tarfile.open(local, "w", format=tarfile.USTAR_FORMAT) as tar:
            def flush():
                nonlocal written
                images = np.zeros((config.batch_size, config.image_size, config.image_size, 3), np.float32)
                images[:len(pending)] = [p[1] for p in pending]
                moments = np.asarray(encode(images))[:len(pending)]  # (n, h, w, 2C)
                for (sample, _, caption), m in zip(pending, moments):
                    key = sample["__key__"]
                    _member(tar, f"{key}.npy", _npy(np.ascontiguousarray(np.transpose(m, (2, 0, 1)), np.float32)))
                    _member(tar, f"{key}.txt", caption.encode())
                    if "json" in sample:
                        _member(tar, f"{key}.json", sample["json"])
                written += len(pending)
                pending.clear()

            while True:
                try:
                    got = shard.next_sample()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    on_skip(path, "?", f"truncated or corrupt shard, rest of the file skipped ({e})")
                    got = None
                if got is None:
                    break
                sample = got[1]
                try:
                    image, caption, _ = webdataset.decode(sample, config.caption_ext)
                except ValueError as e:
                    on_skip(path, sample["__key__"], str(e))
                    continue
                pixels, _ = crop_image(image, np.random.default_rng(0), config)
                pending.append((sample, pixels, caption))
                if len(pending) == config.batch_size:
                    flush()
            if pending:
                flush()
        if paths.is_remote(out):
            paths.upload(local, out)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            os.replace(local, out)
    finally:
        shard.close()
        if os.path.exists(local):
            os.remove(local)
    return written


def encode_all(files: list[str], out_dir: str, config: Any, vae, vae_params: Any) -> dict[str, int]:
    """This host's share of ``files`` (every ``n``-th from its index) encoded into ``out_dir``;
    shards whose output exists are skipped. Returns {input shard: samples written}."""
    host, hosts = config.shard()
    mine = list(files)[host::hosts]
    device = jax.local_devices()[0]
    params = jax.device_put(vae_params, device)

    @jax.jit
    def moments(params, images):
        post = vae.apply({"params": params}, images, method=type(vae).encode)
        return jnp.concatenate([post.mean, post.logvar], axis=-1)

    def encode(images: np.ndarray) -> np.ndarray:
        return moments(params, jax.device_put(images, device))

    skipped: dict[str, int] = {}

    def on_skip(path: str, key: str, reason: str) -> None:
        skipped[path] = skipped.get(path, 0) + 1
        print(f"encode: skipped {os.path.basename(path)}:{key}: {reason}", flush=True)

    done, t0, total = {}, time.perf_counter(), 0
    for i, path in enumerate(mine):
        out = f"{out_dir.rstrip('/')}/{path.rstrip('/').rsplit('/', 1)[-1]}"
        if paths.exists(out):
            print(f"encode: {out} exists, skipped", flush=True)
            continue
        done[path] = encode_shard(path, out, config, encode, on_skip)
        total += done[path]
        print(f"encode: {i + 1}/{len(mine)} shards of host {host}: {out} ({done[path]} samples, "
              f"{total / (time.perf_counter() - t0):.1f} images/s)", flush=True)
    summary = {"host": host, "shards": len(mine), "encoded": done, "skipped": skipped}
    print("encode: " + json.dumps(summary), flush=True)
    return done
