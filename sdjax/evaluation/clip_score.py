"""CLIP score as MLPerf's Stable Diffusion benchmark computes it.

Each image goes through open_clip's evaluation transform, on the host with PIL as open_clip does:
float images in [0, 1] to uint8 by truncation (``(x * 255).astype(uint8)``), the shorter side resized
to the tower's size with PIL's bicubic filter, the centre cropped, scaled to [0, 1] and normalised
with OpenAI's mean and deviation. Image and caption embeddings are scaled to unit length; the score of
a pair is their cosine, the set's score the mean over pairs (no x100, no clamp; ``torchmetrics=True``
gives torchmetrics' ``100 * max(mean, 0)``).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax.models.clip import CLIPConfig, CLIPModel

OPENAI_MEAN = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
OPENAI_STD = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)


def preprocess(image_HWC: np.ndarray, size: int) -> np.ndarray:
    """One image (uint8, or float in [0, 1]) -> the tower's normalised (size, size, 3) float32 input, as
    torchvision's ``Resize(size, BICUBIC)``, ``CenterCrop(size)``, ``ToTensor``, ``Normalize`` on a PIL image."""
    image_HWC = np.asarray(image_HWC)
    if image_HWC.dtype != np.uint8:
        image_HWC = (np.clip(image_HWC, 0, 1) * 255).astype(np.uint8)  # truncation, as MLPerf converts
    pil = Image.fromarray(image_HWC).convert("RGB")
    w, h = pil.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    pixels = np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255
    return (pixels - OPENAI_MEAN) / OPENAI_STD


def cosines_fn(config: CLIPConfig) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``f(params, pixels_BHWC, input_ids_BL)``: each (image, caption) pair's cosine."""
    model = CLIPModel(config)

    def cosines(params, pixels_BHWC, input_ids_BL):
        image, text = model.apply({"params": params}, pixels_BHWC, input_ids_BL)
        return jnp.sum(image * text, axis=-1)

    return cosines


class CLIPScorer:
    """``cosines(images, input_ids)``: each (image, caption) pair's cosine, in batches of ``batch_size``
    (rounded up to a multiple of the local device count; the last one padded) split over the local devices."""

    def __init__(self, params: Any, config: CLIPConfig = CLIPConfig(), batch_size: int = 50):
        self.config = config
        devices = jax.local_devices()
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        self._batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        self._params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        self._cosines = jax.jit(cosines_fn(config), out_shardings=self._batch)

    def cosines(self, images: list[np.ndarray] | np.ndarray, input_ids_BL: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids_BL, np.int32)
        if ids.shape[0] != len(images):
            raise ValueError(f"CLIP score pairs images with captions: got {len(images)} images and {ids.shape[0]} "
                             "captions.")
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = np.stack([preprocess(im, self.config.vision.image_size)
                               for im in images[start:start + self.batch_size]])
            batch_ids, n = ids[start:start + self.batch_size], pixels.shape[0]
            pad = self.batch_size - n  # one compiled shape; the padding's cosines are dropped
            if pad:
                pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), pixels.dtype)])
                batch_ids = np.concatenate([batch_ids, np.repeat(batch_ids[-1:], pad, axis=0)])
            got = self._cosines(self._params, jax.device_put(pixels, self._batch),
                                jax.device_put(batch_ids, self._batch))
            out.append(np.asarray(jax.device_get(got))[:n])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


def score(cosines: np.ndarray, torchmetrics: bool = False) -> float:
    """The set's CLIP score: the mean cosine (MLPerf), or torchmetrics' ``100 * max(mean, 0)``."""
    mean = float(np.mean(np.asarray(cosines, np.float64)))
    return 100 * max(mean, 0.0) if torchmetrics else mean
