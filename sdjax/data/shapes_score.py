"""A non-neural judge for captioned-shapes images: which shape, which colour, which background?

Reads pixels only: the background is the median colour of the border, the shape is every pixel
far from it, its colour the median of those pixels (nearest palette entry), and its kind follows
from geometry: a triangle (apex up) holds most of its mass in the lower half of its bounding box;
otherwise a square fills its box (fill 1) and a circle fills pi/4 of it.
"""

import dataclasses

import numpy as np

from sdjax.data.shapes import COLOR_VALUES, SHAPES

_FAR = 60.0           # RGB distance from the background that counts as "shape"
_MIN_PIXELS = 6       # fewer shape pixels than this: no shape drawn
_TRIANGLE_LOWER = 0.62  # lower-half mass fraction above which the shape is a triangle (ideal: 0.75)
_SQUARE_FILL = 0.89     # box fill above which a symmetric shape is a square (ideal 1.0 vs circle 0.785)


@dataclasses.dataclass(frozen=True)
class Judgement:
    shape: int       # index into SHAPES, -1 when no shape is found
    color: int       # index into COLOR_NAMES, -1 when no shape is found
    background: int  # index into COLOR_NAMES


def _nearest_color(rgb: np.ndarray) -> int:
    return int(np.argmin(((COLOR_VALUES.astype(np.float32) - rgb) ** 2).sum(-1)))


def judge(image: np.ndarray) -> Judgement:
    """Shape, colour and background of one uint8 (H, W, 3) image."""
    img = np.asarray(image, np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest_color(bg_rgb)
    mask = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > _FAR
    if mask.sum() < _MIN_PIXELS:
        return Judgement(-1, -1, background)
    color = _nearest_color(np.median(img[mask], axis=0))
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    fill = box.mean()
    mid = (y1 - y0) / 2
    rows = np.arange(y1 - y0)[:, None] + 0.5
    lower = box[(rows > mid)[:, 0]].sum() / max(box.sum(), 1)
    if lower > _TRIANGLE_LOWER:
        shape = SHAPES.index("triangle")
    elif fill > _SQUARE_FILL:
        shape = SHAPES.index("square")
    else:
        shape = SHAPES.index("circle")
    return Judgement(shape, color, background)


def accuracy(images: np.ndarray, shapes: np.ndarray, colors: np.ndarray) -> dict[str, float]:
    """Fraction of images whose judged shape / colour / both equal the labels asked for."""
    judged = [judge(im) for im in images]
    s = np.array([j.shape for j in judged]) == np.asarray(shapes)
    c = np.array([j.color for j in judged]) == np.asarray(colors)
    return {"shape": float(s.mean()), "color": float(c.mean()), "both": float((s & c).mean())}
