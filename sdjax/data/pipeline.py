"""Training input pipeline: TFDS array_record data read with grain, sharded per host.

`prepare(config)` writes the dataset into `data_dir` once (later calls reuse it);
`make_dataset(config)` returns a checkpointable iterator of per-host batches
`{"image": f32 (B, S, S, 3) in [-1, 1], "text": str (B,), ["input_ids": i32 (B, L)], [labels]}`.
Neither path needs TensorFlow: examples are serialized by tfds' bundled protos and read
back with `tfds` data sources.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

from absl import flags
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sdjax.data import image_folder, shapes

SHAPES_NAME = "captioned_shapes"
IMAGE_FOLDER_NAME = "captioned_images"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to turn it into batches.

    `name` is "captioned_shapes", "captioned_images" or any TFDS dataset name (with
    optional "/config") already prepared as array_record under `data_dir`.
    """

    name: str = SHAPES_NAME
    data_dir: str | None = None  # None: the TFDS default, ~/tensorflow_datasets.
    split: str = "train"
    image_size: int = 32  # Output side; captioned_shapes is also rendered at this size.
    batch_size: int = 8  # Per host.
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None repeats forever, as training wants.
    random_crop: bool = False  # Else a centre crop after resizing the shorter side.
    random_flip: bool = False
    image_key: str = "image"
    text_key: str = "text"  # "a/b" reaches nested features, e.g. coco's "captions/text".
    label_keys: tuple[str, ...] = ()  # Integer features passed through, e.g. ("shape", "color").
    shard_index: int | None = None  # None: jax.process_index().
    shard_count: int | None = None  # None: jax.process_count().
    num_threads: int = 8  # Reader threads per process.
    # Preprocessing processes; 0 keeps everything in-process. Grain gives each worker its own
    # slice, so the batch order (and a saved iterator state) depends on this number.
    num_workers: int = 0
    num_examples: int = 5000  # captioned_shapes only: train examples (test gets a tenth).
    manual_dir: str | None = None  # captioned_images only: folder with metadata.jsonl.

    def __post_init__(self):
        for field in ("image_size", "batch_size", "num_threads", "num_examples"):
            if getattr(self, field) < 1:
                raise ValueError(f"DataConfig.{field} must be >= 1, got {getattr(self, field)}.")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"DataConfig.num_epochs must be None (forever) or >= 1, got {self.num_epochs}.")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be >= 0, got {self.num_workers}.")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("Set both DataConfig.shard_index and shard_count, or neither (one shard per host).")

    def shard_seed(self) -> int:
        """The seed of this host's shard: `seed` with the shard index folded in, so shuffles and
        augmentations of different hosts are independent."""
        return int(np.random.SeedSequence([self.seed, self.shard()[0]]).generate_state(1)[0])

    def shard(self) -> tuple[int, int]:
        """(index, count) of this host's shard, defaulting to the JAX process layout."""
        if self.shard_index is None:
            return jax.process_index(), jax.process_count()
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"DataConfig.shard_index must be in [0, {self.shard_count}), got {self.shard_index}.")
        return self.shard_index, self.shard_count


def builder(config: DataConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder behind `config`, writing/reading array_record files in `data_dir`."""
    if config.name == SHAPES_NAME:
        cfg = shapes.shapes_config(config.image_size, config.num_examples)
        # tfds accepts a predefined config only by name, and a custom one only as an object.
        cfg = cfg.name if cfg.name in shapes.CaptionedShapes.builder_configs else cfg
        return shapes.CaptionedShapes(config=cfg, data_dir=config.data_dir, file_format="array_record")
    if config.name == IMAGE_FOLDER_NAME:
        return image_folder.CaptionedImages(data_dir=config.data_dir, file_format="array_record")
    return tfds.builder(config.name, data_dir=config.data_dir)


def prepare(config: DataConfig) -> tfds.core.DatasetBuilder:
    """Writes the dataset into `data_dir` unless it is already there; returns its builder.

    Only the two local datasets can be built here (nothing is downloaded); other TFDS
    datasets must have been prepared as array_record elsewhere and copied in.
    """
    b = builder(config)
    if config.name == IMAGE_FOLDER_NAME and not b.is_prepared():
        if config.manual_dir is None:
            raise ValueError("captioned_images needs DataConfig.manual_dir: the folder with metadata.jsonl.")
        folder = image_folder.check_folder(config.manual_dir)
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(folder)))
    elif config.name == SHAPES_NAME:
        b.download_and_prepare()
    _check_prepared(b, config)
    return b


def _check_prepared(b: tfds.core.DatasetBuilder, config: DataConfig):
    if not b.is_prepared():
        how = ("run sdjax.data.prepare(config) first" if config.name in (SHAPES_NAME, IMAGE_FOLDER_NAME)
               else f"build it where it can be downloaded (`tfds build {config.name} "
                    "--file_format=array_record`) and copy it there")
        raise FileNotFoundError(f"{config.name} is not prepared in {b.data_dir}: {how}.")
    if b.info.file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
        raise ValueError(f"{config.name} in {b.data_dir} is stored as {b.info.file_format.value}; grain needs "
                         "random access: rebuild it with --file_format=array_record.")
    try:
        b.info.splits[config.split]  # Also parses slices such as "train[:90%]".
    except ValueError as e:
        raise ValueError(f"{config.name} in {b.data_dir}: {e}") from e


def _lookup(example: dict, key: str):
    for part in key.split("/"):
        example = example[part]
    return example


def _resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new_wh = (max(size, round(w * scale)), max(size, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(new_wh, Image.Resampling.BICUBIC, reducing_gap=None))


def _preprocess(example: dict, rng: np.random.Generator, config: DataConfig,
                tokenize: Callable[[str], Sequence[int]] | None) -> dict:
    """Resizes, crops, flips and scales one image; picks and tokenizes one caption."""
    image = _resize_shorter_side(_lookup(example, config.image_key), config.image_size)
    h, w, s = image.shape[0], image.shape[1], config.image_size
    if config.random_crop:
        top, left = rng.integers(h - s + 1), rng.integers(w - s + 1)
    else:
        top, left = (h - s) // 2, (w - s) // 2
    image = image[top:top + s, left:left + s]
    if config.random_flip and rng.random() < 0.5:
        image = image[:, ::-1]
    text = _lookup(example, config.text_key)
    if not isinstance(text, (bytes, str)):  # Several captions per image: train on one at random.
        text = text[rng.integers(len(text))]
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    out = {"image": image.astype(np.float32) / 127.5 - 1.0, "text": text}
    if tokenize is not None:
        out["input_ids"] = np.asarray(tokenize(text), np.int32)
    out.update({k: np.int32(example[k]) for k in config.label_keys})
    return out


def make_dataset(config: DataConfig, tokenize: Callable[[str], Sequence[int]] | None = None,
                 drop_remainder: bool = True) -> grain.DatasetIterator:
    """This host's batches: shuffled by `config.seed`, with `get_state()/set_state()`.

    `tokenize` maps one caption to a fixed-length id sequence (e.g. 77 CLIP ids); the
    batch then carries them as int32 "input_ids" (B, L) next to the raw "text". With
    `drop_remainder=False` a finite pass (`num_epochs`) ends with a smaller last batch.
    """
    b = builder(config)
    _check_prepared(b, config)
    shard_index, shard_count = config.shard()
    ds = grain.MapDataset.source(b.as_data_source(split=config.split))[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"Shard {shard_index} of {shard_count} of {config.name}[{config.split}] is empty.")
    ds = ds.seed(config.shard_seed())
    if config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(config.num_epochs)
    ds = ds.random_map(functools.partial(_preprocess, config=config, tokenize=tokenize))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                                 prefetch_buffer_size=2 * config.batch_size))
    it_ds = it_ds.batch(config.batch_size, drop_remainder=drop_remainder)
    if config.num_workers:
        # Grain's worker processes read absl flags; scripts not run by absl.app have parsed none.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return iter(it_ds)


def iterator_save_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointSave:
    """Orbax args saving the iterator's position, e.g. inside `ocp.args.Composite(data=...)`.

    One JSON file per process, so every host resumes its own shard.
    """
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointRestore:
    """Orbax args restoring a saved position into `iterator` (built from the same config)."""
    return grain.checkpoint.CheckpointRestore(iterator)
