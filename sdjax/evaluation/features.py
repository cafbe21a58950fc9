"""Inception features of image folders and of image batches, batched over every local device.

A folder is read as pytorch-fid reads it: the files directly in it whose extension is one of
``IMAGE_EXTENSIONS`` (lower case), sorted, each converted to RGB and scaled to [0, 1]. Images
that do not decode are skipped and counted (pytorch-fid stops at the first).
"""

import concurrent.futures
import dataclasses
import os
import pathlib
import sys
from typing import Any, Callable, Iterator

import jax
import numpy as np
from PIL import Image

from sdjax.models.inception import FEATURES, FIDInceptionV3

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


def image_files(folder: str) -> list[str]:
    """pytorch-fid's file list: ``folder/*.{ext}`` for its extensions, sorted; an error if there are none."""
    path = pathlib.Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of images.")
    files = sorted(f for ext in IMAGE_EXTENSIONS for f in path.glob(f"*.{ext}"))
    if not files:
        raise ValueError(f"{folder}: no images in it (looked for *.{{{','.join(IMAGE_EXTENSIONS)}}}, lower case, "
                         "not in subfolders).")
    return [str(f) for f in files]


def read_image(path: str) -> np.ndarray | None:
    """An image as uint8 RGB (H, W, 3), or None if it does not decode."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _read(path: str) -> np.ndarray | None:
    """An image as float32 (H, W, 3) in [0, 1] (torchvision's ``ToTensor``), or None if it does not decode."""
    image = read_image(path)
    return None if image is None else image.astype(np.float32) / 255


@dataclasses.dataclass
class Skipped:
    """Images that did not decode."""
    files: list[str] = dataclasses.field(default_factory=list)

    def report(self, what: str) -> None:
        if self.files:
            shown = ", ".join(os.path.basename(f) for f in self.files[:5])
            more = f" and {len(self.files) - 5} more" if len(self.files) > 5 else ""
            print(f"{what}: skipped {len(self.files)} images that do not decode: {shown}{more}", file=sys.stderr,
                  flush=True)


def inception_fn() -> Callable[[Any, jax.Array], jax.Array]:
    """``f(params, images_NHWC)``: the pool features the evaluator computes (f32)."""
    model = FIDInceptionV3()
    return lambda params, images_NHWC: model.apply({"params": params}, images_NHWC)


class InceptionFeatures:
    """``features(images)``: images (N, H, W, 3) in [0, 1] -> (N, 2048) float32, in batches of
    ``batch_size`` (rounded up to a multiple of the local device count) split over the local devices;
    one compiled program per image size."""

    def __init__(self, params: Any, batch_size: int = 50):
        devices = jax.local_devices()
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._params = jax.device_put(params, replicated)
        self._apply = jax.jit(inception_fn(), out_shardings=self._sharding)

    def __call__(self, images_NHWC: np.ndarray) -> np.ndarray:
        images_NHWC = np.asarray(images_NHWC, np.float32)
        n = images_NHWC.shape[0]
        out = []
        for start in range(0, n, self.batch_size):
            batch = images_NHWC[start:start + self.batch_size]
            pad = self.batch_size - batch.shape[0]
            if pad:  # one compiled shape: the last batch is padded and its padding dropped
                batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
            feats = self._apply(self._params, jax.device_put(batch, self._sharding))
            out.append(np.asarray(jax.device_get(feats))[:batch.shape[0] - pad])
        return np.concatenate(out) if out else np.zeros((0, FEATURES), np.float32)

    def of_folder(self, folder: str, progress: bool = True) -> tuple[np.ndarray, Skipped]:
        """The features of every image in ``folder`` (pytorch-fid's order) and the images skipped."""
        files, skipped, out, done = image_files(folder), Skipped(), [], 0
        for batch in _batches(files, self.batch_size, skipped):
            out.append(self(batch))
            done += len(batch)
            if progress:
                print(f"inception features: {done}/{len(files)} images of {folder}", file=sys.stderr, flush=True)
        skipped.report(folder)
        if not out:
            raise ValueError(f"{folder}: none of its {len(files)} images decode.")
        return np.concatenate(out), skipped


def _batches(files: list[str], batch_size: int, skipped: Skipped) -> Iterator[np.ndarray]:
    """Decoded images in batches of up to ``batch_size`` that share one size, read a few batches ahead
    on a thread pool."""
    chunk = 4 * batch_size
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        pending: list[np.ndarray] = []
        for start in range(0, len(files), chunk):
            names = files[start:start + chunk]
            for path, image in zip(names, pool.map(_read, names)):
                if image is None:
                    skipped.files.append(path)
                    continue
                if pending and (len(pending) == batch_size or image.shape != pending[0].shape):
                    yield np.stack(pending)
                    pending = []
                pending.append(image)
        if pending:
            yield np.stack(pending)
