"""Images in and out: the one convention (uint8 (B, H, W, 3), or float in [0, 1]; PIL accepted as
input), and the grids of sample and reconstruction images."""

from typing import Any, Sequence

import numpy as np


def is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.")


def as_image_array(images: Any) -> np.ndarray:
    """Images as given by a user (a PIL image, a list of them, or an array (B, H, W, 3) / (H, W, 3)
    of uint8, or of floats in [0, 1]) -> float32 (B, H, W, 3) in [0, 1]."""
    if is_pil(images):
        images = [images]
    if isinstance(images, (list, tuple)) and images and is_pil(images[0]):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) or (H, W, 3), or PIL images; got shape {arr.shape}.")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.min() < -1e-3 or arr.max() > 1.001:
        raise ValueError(f"float images must be in [0, 1] (got values in [{arr.min():.3g}, {arr.max():.3g}]); "
                         "or pass uint8 images in [0, 255].")
    return np.clip(arr, 0.0, 1.0)


def as_mask_array(masks: Any) -> np.ndarray:
    """Inpainting masks as given by a user (PIL images; or arrays (B, H, W), (B, H, W, 1), (H, W) of
    uint8 or floats in [0, 1]; white / 1 = repaint) -> float32 (B, H, W) in [0, 1]."""
    if is_pil(masks):
        masks = [masks]
    if isinstance(masks, (list, tuple)) and masks and is_pil(masks[0]):
        masks = np.stack([np.asarray(m.convert("L")) for m in masks])
    arr = np.asarray(masks)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"masks must be (B, H, W), (B, H, W, 1) or (H, W), or PIL images; got shape {arr.shape}.")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(f"float masks must be in [0, 1] (1 = repaint; got values in [{arr.min():.3g}, "
                         f"{arr.max():.3g}]); or pass uint8 masks in [0, 255].")
    return arr


def to_uint8(images_BHWC: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded as the originals do."""
    return (np.clip(images_BHWC, 0.0, 1.0) * 255).round().astype(np.uint8)


def grid(images: Sequence[np.ndarray] | np.ndarray, cols: int, fill: int = 255) -> np.ndarray:
    """uint8 images (each (H, W, C), all one size) tiled row by row into one image of ``cols`` columns
    (at most one per image); the last row's empty cells are ``fill``."""
    images = list(images)
    h, w, c = np.shape(images[0])
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    out = np.full((rows * h, cols * w, c), fill, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return out


def signed_grid(images_BHWC: np.ndarray, cols: int) -> np.ndarray:
    """``grid`` of images in [-1, 1] (the models' range): training's sample and reconstruction grids."""
    return grid(to_uint8((np.asarray(images_BHWC, np.float32) + 1.0) / 2.0), cols)
