"""A non-neural judge for captioned-shapes images: which shape, which colour, which background?

Reads pixels only. The background is the median colour of the border; the shape's colour is the
median of the pixels far from it (nearest palette entry). The shape's mask is every pixel closer to
the shape colour than to the background (a midpoint threshold, so blurred edges move it little),
and its kind is the template (the mask's bounding box, the ellipse inscribed in it, or the apex-up
triangle inscribed in it) with the highest intersection-over-union.
"""

import dataclasses

import numpy as np

from sdjax.data.shapes import COLOR_VALUES, SHAPES

_FAR = 60.0       # RGB distance from the background that surely belongs to the shape
_MIN_PIXELS = 6   # fewer shape pixels than this: no shape drawn


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
    far = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > _FAR
    if far.sum() < _MIN_PIXELS:
        return Judgement(-1, -1, background)
    fg_rgb = np.median(img[far], axis=0)
    color = _nearest_color(fg_rgb)
    # Position of each pixel along the background -> shape colour line; the shape is past halfway.
    axis = fg_rgb - bg_rgb
    mask = ((img - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6) > 0.5
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    ious = [_iou(box, template) for template in _templates(*box.shape)]
    return Judgement(int(np.argmax(ious)), color, background)


def _templates(h: int, w: int) -> list[np.ndarray]:
    """Circle (inscribed ellipse), square (the box) and apex-up triangle, in SHAPES order."""
    y, x = np.mgrid[:h, :w] + 0.5
    u, v = (x - w / 2) / (w / 2), (y - h / 2) / (h / 2)   # both in [-1, 1]
    shapes = {"circle": u ** 2 + v ** 2 <= 1.0, "square": np.ones((h, w), bool),
              "triangle": np.abs(u) <= (v + 1) / 2}
    return [shapes[name] for name in SHAPES]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def accuracy(images: np.ndarray, shapes: np.ndarray, colors: np.ndarray) -> dict[str, float]:
    """Fraction of images whose judged shape / colour / both equal the labels asked for."""
    judged = [judge(im) for im in images]
    s = np.array([j.shape for j in judged]) == np.asarray(shapes)
    c = np.array([j.color for j in judged]) == np.asarray(colors)
    return {"shape": float(s.mean()), "color": float(c.mean()), "both": float((s & c).mean())}
