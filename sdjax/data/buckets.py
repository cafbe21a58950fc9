"""Aspect-ratio buckets: every image goes to the (height, width) of nearest aspect ratio, resized
to cover it and cropped; every batch comes from one bucket.

``auto`` makes kohya/NovelAI-style buckets: sides multiples of 64 between half and twice
``image_size``, the largest area within ``image_size`` squared. Which bucket a step uses is drawn
from (seed, step) with weights proportional to the examples waiting in each bucket, summed over
all hosts (one tiny all-gather per step), so every host picks the same bucket and no bucket's
queue grows without bound.
"""

import math
from collections.abc import Sequence

import numpy as np

STEP = 64


def auto(image_size: int, step: int = STEP) -> tuple[tuple[int, int], ...]:
    """(height, width) buckets: for each width from half to twice ``image_size`` (multiples of
    ``step``), the tallest height within the ``image_size`` squared pixel budget and the same limits,
    and the same pair turned a quarter."""
    lo, hi, budget = max(step, image_size // 2 // step * step), image_size * 2 // step * step, image_size ** 2
    out = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, budget // w // step * step)
        if h >= lo:
            out |= {(h, w), (w, h)}  # each landscape bucket has its portrait twin
    return tuple(sorted(out, key=lambda hw: hw[1] / hw[0]))


def parse(value, image_size: int) -> tuple[tuple[int, int], ...] | None:
    """``data.buckets``: None (square ``image_size`` crops), "auto", or (height, width) pairs as a
    sequence or a string ``"512x512,448x576"``."""
    if value is None or value == "" or value == ():
        return None
    if value == "auto":
        return auto(image_size)
    if isinstance(value, str):
        try:
            value = [tuple(int(x) for x in part.lower().split("x")) for part in value.split(",") if part.strip()]
        except ValueError:
            value = [()]
    pairs = tuple(tuple(int(x) for x in pair) for pair in value)
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise ValueError(f"data.buckets={value!r}: give 'auto' or (height, width) pairs, e.g. '512x512,448x576'.")
    return tuple(sorted(set(pairs), key=lambda hw: hw[1] / hw[0]))


def nearest(buckets: Sequence[tuple[int, int]], height: int, width: int) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (in log ratio)."""
    ratio = math.log(width / height)
    return int(np.argmin([abs(math.log(w / h) - ratio) for h, w in buckets]))


def draw(seed: int, step: int, waiting: Sequence[int]) -> int:
    """The bucket of global batch ``step``: drawn from (seed, step) in proportion to ``waiting``."""
    weights = np.asarray(waiting, np.float64)
    return int(np.random.default_rng([seed, step, 7]).choice(len(weights), p=weights / weights.sum()))
