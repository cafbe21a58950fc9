"""The pixel judge of captioned-shapes images, checked on rendered ground truth."""

import numpy as np

from sdjax.data import shapes
from sdjax_demo.shapes_score import accuracy, judge


def _rendered(n: int, image_size: int, seed: int, noise: float = 0.0):
    rng = np.random.default_rng(seed)
    ims, sh, co = [], [], []
    for _ in range(n):
        s, c = int(rng.integers(3)), int(rng.integers(6))
        bg = int(rng.choice([b for b in range(6) if b != c]))
        size = rng.uniform(0.3, 0.7) * image_size
        cx, cy = rng.uniform(size / 2, image_size - size / 2, 2)
        im = shapes.render_shape(s, c, bg, size, cx, cy, image_size).astype(np.float32)
        im = np.clip(im + rng.normal(0, noise, im.shape), 0, 255).astype(np.uint8)
        ims.append(im), sh.append(s), co.append(c)
    return np.stack(ims), np.array(sh), np.array(co)


def test_judge_reads_rendered_shapes():
    ims, sh, co = _rendered(300, 32, seed=0)
    acc = accuracy(ims, sh, co)
    assert acc["color"] == 1.0
    assert acc["shape"] >= 0.97


def test_judge_tolerates_pixel_noise():
    ims, sh, co = _rendered(200, 32, seed=1, noise=12.0)
    acc = accuracy(ims, sh, co)
    assert acc["color"] >= 0.98 and acc["shape"] >= 0.9


def test_judge_tolerates_blur():
    from PIL import Image, ImageFilter

    ims, sh, co = _rendered(200, 32, seed=2)
    blurred = np.stack([np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(0.8))) for i in ims])
    acc = accuracy(blurred, sh, co)
    assert acc["color"] >= 0.98 and acc["shape"] >= 0.97


def test_blank_image_has_no_shape():
    j = judge(np.full((32, 32, 3), shapes.COLOR_VALUES[2], np.uint8))
    assert (j.shape, j.color, j.background) == (-1, -1, 2)
