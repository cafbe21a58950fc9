"""Captioned shapes: a synthetic text-to-image set rendered on the fly, no download.

Each image is one flat-coloured shape on a flat background of another colour, captioned
"a red circle on a blue background". The train split never shows the (shape, colour)
pairs in `HELDOUT_COMBOS`; the test split draws from every pair, so a model's samples can
be scored separately on seen and held-out combinations.
"""

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (230, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
}
COLOR_NAMES = tuple(COLORS)
COLOR_VALUES = np.array(list(COLORS.values()), np.uint8)
# (shape, colour) pairs never shown in training: every shape and every colour still
# appears in training with other partners.
HELDOUT_COMBOS = (("circle", "blue"), ("square", "yellow"), ("triangle", "red"))
_HELDOUT_IDS = frozenset((SHAPES.index(s), COLOR_NAMES.index(c)) for s, c in HELDOUT_COMBOS)
_ALL_COMBOS = tuple((s, c) for s in range(len(SHAPES)) for c in range(len(COLOR_NAMES)))
_SEEN_COMBOS = tuple(sc for sc in _ALL_COMBOS if sc not in _HELDOUT_IDS)
# Shape extent as a fraction of the image side: small enough that the background always
# covers most of the image border, large enough that the shape spans several latent cells of
# a 4x-downsampling autoencoder at 32x32 (3.6 to 6 cells), so its outline survives encoding.
_MIN_SIZE, _MAX_SIZE = 0.45, 0.75


def is_heldout(shape: int, color: int) -> bool:
    """Whether the (shape, colour) label pair is one the train split never shows."""
    return (shape, color) in _HELDOUT_IDS


def caption(shape: int, color: int, background: int) -> str:
    return f"a {COLOR_NAMES[color]} {SHAPES[shape]} on a {COLOR_NAMES[background]} background"


def render_shape(
    shape: int, color: int, background: int, size: float, cx: float, cy: float, image_size: int
) -> np.ndarray:
    """Renders one shape as a uint8 (image_size, image_size, 3) image without anti-aliasing.

    `shape`, `color`, `background` index `SHAPES` and `COLORS`; `size` is the shape's full
    width and height in pixels and (`cx`, `cy`) its centre, x to the right, y down. Every
    pixel is exactly the shape colour or the background colour.
    """
    y, x = np.mgrid[:image_size, :image_size] + 0.5
    dx, dy, half = x - cx, y - cy, size / 2
    if SHAPES[shape] == "circle":
        mask = dx**2 + dy**2 <= half**2
    elif SHAPES[shape] == "square":
        mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # Upright isosceles triangle: apex at the top, base at the bottom of the box.
        mask = (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    return np.where(mask[..., None], COLOR_VALUES[color], COLOR_VALUES[background]).astype(np.uint8)


def _sample_example(rng: np.random.Generator, image_size: int, heldout_allowed: bool) -> dict:
    """Draws labels, size and position, and renders them; the building block of each split."""
    combos = _ALL_COMBOS if heldout_allowed else _SEEN_COMBOS
    shape, color = combos[rng.integers(len(combos))]
    background = rng.choice([c for c in range(len(COLOR_NAMES)) if c != color])
    size = rng.uniform(_MIN_SIZE, _MAX_SIZE) * image_size
    cx, cy = rng.uniform(size / 2, image_size - size / 2, size=2)
    image = render_shape(shape, color, background, size, cx, cy, image_size)
    return {"image": image, "text": caption(shape, color, background), "shape": shape,
            "color": color, "background": int(background)}


def _png(image: np.ndarray) -> bytes:
    # tfds encodes numpy images with tf.image; handing it PNG bytes keeps TensorFlow out.
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclasses.dataclass
class CaptionedShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 32
    num_train: int = 5000
    num_test: int = 500
    seed: int = 0


def shapes_config(image_size: int = 32, num_train: int = 5000, num_test: int | None = None,
                  seed: int = 0) -> CaptionedShapesConfig:
    """A builder config named after all its fields, so different settings never share files."""
    num_test = max(num_train // 10, 1) if num_test is None else num_test
    for field, value in (("image_size", image_size), ("num_train", num_train), ("num_test", num_test)):
        if value < 1:
            raise ValueError(f"captioned_shapes needs {field} >= 1, got {value}.")
    if image_size < 8:
        raise ValueError(f"captioned_shapes renders shapes of at least 8 pixels, got image_size={image_size}.")
    return CaptionedShapesConfig(
        name=f"{image_size}px_{num_train}train_{num_test}test_seed{seed}",
        description=f"{image_size}x{image_size} images, {num_train} train / {num_test} test, seed {seed}.",
        image_size=image_size, num_train=num_train, num_test=num_test, seed=seed)


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic captioned shapes, deterministic from the config's seed."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Circles, squares and triangles in six colours.",
                     "1.1.0": "Shapes span 45-75% of the side (was 30-70%)."}
    BUILDER_CONFIGS = [shapes_config(32), shapes_config(64)]
    # tfds looks for download checksums beside the code through `importlib_resources`, which
    # it only installs on Python < 3.9; this builder downloads nothing, so skip the lookup.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "text": tfds.features.Text(),
                "shape": tfds.features.ClassLabel(names=SHAPES),
                "color": tfds.features.ClassLabel(names=COLOR_NAMES),
                "background": tfds.features.ClassLabel(names=COLOR_NAMES),
            }),
            supervised_keys=("image", "text"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        cfg = self.builder_config
        return {"train": self._generate_examples(0, cfg.num_train, heldout_allowed=False),
                "test": self._generate_examples(1, cfg.num_test, heldout_allowed=True)}

    def _generate_examples(self, split_id: int, num: int, heldout_allowed: bool):
        cfg = self.builder_config
        for i in range(num):
            ex = _sample_example(np.random.default_rng([cfg.seed, split_id, i]), cfg.image_size,
                                heldout_allowed)
            yield i, {**ex, "image": _png(ex["image"])}
