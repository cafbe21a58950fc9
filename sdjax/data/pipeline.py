"""Training input pipeline: TFDS array_record data read with grain, in global batches.

`prepare_on_all_hosts(config)` writes the dataset into `data_dir` once per host (or once, when
the hosts share `data_dir`) and checks that every host reads the same data; `make_dataset(config)`
returns this host's checkpointable iterator of batches
`{"image": f32 (B, S, S, 3) in [-1, 1], "text": str (B,), ["input_ids": i32 (B, L)], [labels]}`.
Host i of n reads rows [i*B, (i+1)*B) of every global batch of n*B examples, so the global batch
is the same for any number of hosts and a run resumes on another number of hosts too.
Neither path needs TensorFlow: examples are serialized by tfds' bundled protos and read back
with `tfds` data sources.
"""

import dataclasses
import functools
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from PIL import Image

from sdjax import configs, paths
from sdjax.data import buckets as buckets_lib, image_folder, shapes, webdataset

SHAPES_NAME = "captioned_shapes"
IMAGE_FOLDER_NAME = "captioned_images"
WEBDATASET_NAME = "webdataset"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to turn it into batches.

    `name` is "captioned_shapes", "captioned_images", "webdataset" (the .tar shards of `files`,
    read in place: ``sdjax.data.webdataset``) or any TFDS dataset name (with optional "/config")
    already prepared as array_record under `data_dir`.
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
    # Held-out images for evaluation: None = the dataset's "test" split when it has one, otherwise
    # the last `holdout` fraction of `split` (at least one example), which training then skips.
    eval_split: str | None = None
    holdout: float = 0.02
    # webdataset only: the shards (a brace range, a glob or a comma-separated list; local or gs://),
    # the caption member's extension, files read at once per host, and the shuffle window in samples.
    files: str | None = None
    caption_ext: str = "txt"
    interleave: int = 4
    shuffle_buffer: int = 1000
    # Aspect-ratio buckets: "auto", or "HxW,HxW,..." (sdjax.data.buckets); None: squares.
    buckets: str | None = None
    # webdataset of precomputed latents (MLPerf's layout, or `sdjax-train encode`'s): the member holding each
    # sample's autoencoder moments, an .npy of (2C, h, w); None: the samples hold images.
    moments_ext: str | None = None

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
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"DataConfig.holdout must be in (0, 1), got {self.holdout}.")
        if (self.name == WEBDATASET_NAME) != (self.files is not None):
            raise ValueError("data.name=webdataset reads the shards of data.files (e.g. --config.data.files="
                             "'/data/laion/{00000..00099}.tar'); set both, or neither.")
        if self.name == WEBDATASET_NAME and self.num_epochs is not None:
            raise ValueError("data.num_epochs: a webdataset stream repeats until train.steps (every host yields a "
                             "batch at every step); leave num_epochs unset.")
        if self.moments_ext is not None and (self.name != WEBDATASET_NAME or self.buckets or self.random_crop
                                             or self.random_flip):
            raise ValueError("data.moments_ext reads precomputed latents from webdataset shards "
                             "(data.name=webdataset), as encoded: without data.buckets, random_crop or random_flip.")
        if self.buckets is not None:
            buckets_lib.parse(self.buckets, self.image_size)
        if self.interleave < 1 or self.shuffle_buffer < 1:
            raise ValueError("data.interleave and data.shuffle_buffer must be >= 1.")
        bucket = "for data in a bucket, use data.name=webdataset with data.files=gs://..."
        paths.expand_fields(self, "data", ("data_dir", "manual_dir"), local={"data_dir": bucket, "manual_dir": bucket})

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict, batch_size: int, **overrides) -> "DataConfig":
        """From a training config's ``data`` section (see ``config_section``); unknown keys are an
        error naming the valid ones."""
        values = dict(section.to_dict(), **overrides)
        valid = {f.name for f in dataclasses.fields(cls)} - {"batch_size"}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"data.{unknown[0]} is not a data setting; valid keys: {', '.join(sorted(valid))}.")
        return cls(**values, batch_size=batch_size)

    def shard(self) -> tuple[int, int]:
        """(index, count) of this host's shard, defaulting to the JAX process layout."""
        if self.shard_index is None:
            return jax.process_index(), jax.process_count()
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"DataConfig.shard_index must be in [0, {self.shard_count}), got {self.shard_index}.")
        return self.shard_index, self.shard_count


def config_section(**values) -> ml_collections.ConfigDict:
    """A training config's ``data`` section: every ``DataConfig`` field but ``batch_size`` (that is
    ``train.batch_size`` split over hosts), at its default unless given in ``values``."""
    return configs.section(DataConfig, exclude=("batch_size",), **values)


def builder(config: DataConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder behind `config`, writing/reading array_record files in `data_dir`."""
    if config.name == SHAPES_NAME:
        cfg = shapes.shapes_config(config.image_size, config.num_examples)
        # tfds accepts a predefined config only by name, and a custom one only as an object.
        cfg = cfg.name if cfg.name in shapes.CaptionedShapes.builder_configs else cfg
        return shapes.CaptionedShapes(config=cfg, data_dir=config.data_dir, file_format="array_record")
    if config.name == IMAGE_FOLDER_NAME:
        if config.manual_dir is None:
            raise ValueError("data.name=captioned_images needs data.manual_dir: the folder with your images and "
                             "metadata.jsonl (--config.data.manual_dir=FOLDER).")
        return image_folder.CaptionedImages(config=image_folder.folder_config(config.manual_dir),
                                            data_dir=config.data_dir, file_format="array_record")
    return tfds.builder(config.name, data_dir=config.data_dir)


def prepare(config: DataConfig) -> tfds.core.DatasetBuilder:
    """Writes the dataset into `data_dir` unless it is already there; returns its builder.

    Only the two local datasets can be built here (nothing is downloaded); other TFDS
    datasets must have been prepared as array_record elsewhere and copied in. An image folder
    is prepared under a config named after its contents, so a changed folder is prepared anew.
    """
    b = builder(config)
    if config.name == IMAGE_FOLDER_NAME and not b.is_prepared():
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=config.manual_dir))
    elif config.name == SHAPES_NAME:
        b.download_and_prepare()
    _check_prepared(b, config)
    return b


def prepare_on_all_hosts(config: DataConfig) -> "tfds.core.DatasetBuilder | webdataset.Shards":
    """``prepare`` on every host, then a check that all of them read the same data.

    Webdataset shards are read in place: each host lists them (``webdataset.Shards``), nothing is
    prepared.

    Process 0 prepares first; every other host then reuses its copy when it sees it (a shared
    ``data_dir``) or prepares its own byte-identical one (each its own ``~/tensorflow_datasets``),
    so no shared file system is needed. A host that fails, or whose data differs from host 0's
    (a different image folder, say), stops every host with an error naming it.
    """
    def attempt() -> tuple[tfds.core.DatasetBuilder | None, Exception | None]:
        try:
            if config.name == WEBDATASET_NAME:
                return webdataset.Shards.find(config.files), None
            return prepare(config), None
        except Exception as e:  # noqa: BLE001 - re-raised below, once every host knows
            return None, e

    me = jax.process_index()
    b, error = attempt() if me == 0 else (None, None)
    multihost_utils.sync_global_devices("sdjax data prepared on host 0")
    if me != 0:
        b, error = attempt()
    digest = (np.frombuffer(hashlib.sha256(_describe(b).encode()).digest()[:16], np.uint32) if b
              else np.zeros(4, np.uint32))
    rows = np.asarray(multihost_utils.process_allgather(np.concatenate([[error is None], digest]).astype(np.uint32)))
    rows = rows.reshape(jax.process_count(), 5)
    if error is not None:
        raise error
    failed = [i for i in range(len(rows)) if not rows[i, 0]]
    if failed:
        raise ValueError(f"Host(s) {failed} could not prepare {config.name} (their logs say why); this host did.")
    differ = [i for i in range(len(rows)) if (rows[i, 1:] != rows[0, 1:]).any()]
    if differ:
        raise ValueError(f"Host(s) {differ} read different data from host 0 ({_describe(b)} here): give every host "
                         "the same image folder (manual_dir) and dataset, or a data_dir they all see.")
    return b


def _describe(b: "tfds.core.DatasetBuilder | webdataset.Shards") -> str:
    if isinstance(b, webdataset.Shards):
        return b.describe()
    splits = ", ".join(f"{k}: {v.num_examples}" for k, v in sorted(b.info.splits.items()))
    return f"{b.info.full_name} ({splits})"


def splits(b: tfds.core.DatasetBuilder, config: DataConfig) -> tuple[str, str]:
    """(training split, held-out split): ``config.eval_split``, else the dataset's "test" split,
    else the last ``config.holdout`` fraction of ``config.split`` (at least one example), which
    the training split then leaves out."""
    if config.eval_split is not None:
        return config.split, config.eval_split
    if "test" in b.info.splits and config.split != "test":
        return config.split, "test"
    n = len(b.as_data_source(split=config.split))
    k = max(1, int(np.ceil(n * config.holdout)))
    if k >= n:
        raise ValueError(f"{config.name}[{config.split}] has {n} examples: too few to hold {k} out for evaluation.")
    return f"{config.split}[:-{k}]", f"{config.split}[-{k}:]"


def _check_prepared(b: tfds.core.DatasetBuilder, config: DataConfig):
    if not b.is_prepared():
        how = ("run sdjax.data.prepare(config) first" if config.name in (SHAPES_NAME, IMAGE_FOLDER_NAME)
               else f"build it where it can be downloaded (`tfds build {config.name} "
                    "--file_format=array_record`) and copy it there")
        raise FileNotFoundError(f"{config.name} is not prepared in {b.data_dir} on host {jax.process_index()}: {how}.")
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


def _resize_to_cover(image: np.ndarray, th: int, tw: int) -> np.ndarray:
    """Resized (bicubic, aspect kept) to the smallest size covering ``th`` x ``tw``."""
    h, w = image.shape[:2]
    scale = max(th / h, tw / w)
    new_wh = (max(tw, round(w * scale)), max(th, round(h * scale)))
    if new_wh == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize(new_wh, Image.Resampling.BICUBIC, reducing_gap=None))


def crop_image(image: np.ndarray, rng: np.random.Generator, config: DataConfig,
               size: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Resized to cover ``size`` (height, width; default the ``config.image_size`` square), cropped to it
    (random or centred), flipped at random; f32 in [-1, 1], with the crop's (top, left) in the
    resized image."""
    th, tw = size or (config.image_size, config.image_size)
    image = _resize_to_cover(image, th, tw)
    h, w = image.shape[:2]
    if config.random_crop:
        top, left = rng.integers(h - th + 1), rng.integers(w - tw + 1)
    else:
        top, left = (h - th) // 2, (w - tw) // 2
    image = image[top:top + th, left:left + tw]
    if config.random_flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return image.astype(np.float32) / 127.5 - 1.0, (int(top), int(left))


def token_ids(tokenize: Callable[[str], Any] | None, text: str) -> dict[str, np.ndarray]:
    """A caption's ids as the batch carries them: ``tokenize``'s sequence as "input_ids", or (a model
    with two tokenizers, SDXL) its dict of named sequences ("input_ids", "input_ids_2"); none without it."""
    if tokenize is None:
        return {}
    ids = tokenize(text)
    return {k: np.asarray(v, np.int32) for k, v in (ids.items() if isinstance(ids, dict) else [("input_ids", ids)])}


def example(image: np.ndarray, text: str, original_size: tuple[int, int], rng: np.random.Generator,
            config: DataConfig, tokenize: Callable[[str], Any] | None,
            size: tuple[int, int] | None = None) -> dict:
    """One training example: the cropped image, its caption (and ids, ``token_ids``), its original
    (height, width) and the crop's (top, left), as SDXL's micro-conditioning takes them."""
    pixels, top_left = crop_image(image, rng, config, size)
    return {"image": pixels, "text": text, "original_size": np.asarray(original_size, np.int32),
            "crop_top_left": np.asarray(top_left, np.int32)} | token_ids(tokenize, text)


def preprocess(row: dict, rng: np.random.Generator, config: DataConfig,
               tokenize: Callable[[str], Sequence[int]] | None, size: tuple[int, int] | None = None) -> dict:
    """One TFDS row as a training example (``example``, cropped to ``size``, default the square):
    of several captions, one at random."""
    image, text = _lookup(row, config.image_key), _lookup(row, config.text_key)
    if not isinstance(text, (bytes, str)):
        text = text[rng.integers(len(text))]
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    out = example(image, text, image.shape[:2], rng, config, tokenize, size)
    out.update({k: np.int32(row[k]) for k in config.label_keys})
    return out


def make_dataset(config: DataConfig, tokenize: Callable[[str], Sequence[int]] | None = None,
                 drop_remainder: bool = True) -> grain.DatasetIterator:
    """This host's batches of `config.split`: shuffled by `config.seed`, with `get_state()/set_state()`.

    `tokenize` maps one caption to a fixed-length id sequence (e.g. 77 CLIP ids); the
    batch then carries them as int32 "input_ids" (B, L) next to the raw "text" (a dict of
    sequences, one per tokenizer, gives one array per name: ``token_ids``). With
    `drop_remainder=False` a finite pass (`num_epochs`) ends with a smaller last batch.
    """
    if config.name == WEBDATASET_NAME:
        host, hosts = config.shard()
        def transform(image, text, original_size, rng, size):
            if config.moments_ext:  # precomputed latents: the "image" is the moments (h, w, 2C)
                out = {"moments": image, "text": text, "original_size": np.asarray(original_size, np.int32)}
                return out | token_ids(tokenize, text)
            return example(image, text, original_size, rng, config, tokenize, size)

        return webdataset.WebDatasetIterator(webdataset.expand(config.files), config, transform, host, hosts)
    b = builder(config)
    _check_prepared(b, config)
    ds = grain.MapDataset.source(b.as_data_source(split=config.split))
    if len(ds) == 0:
        raise ValueError(f"{config.name}[{config.split}] is empty.")
    if config.buckets:
        return bucket_batches(ds, config, tokenize)
    return global_batches(ds, config, functools.partial(preprocess, config=config, tokenize=tokenize), drop_remainder)


# ---- aspect-ratio buckets of a dataset read by index -------------------------------------------------


class _BucketOrder(grain.MapDataset):
    """The global stream of a bucketed dataset: element k is (source index, bucket), and every run of
    ``global_batch`` consecutive elements (one global batch) shares a bucket.

    Epoch e (from ``seed``): each bucket's examples in a random order, cut into global batches (a
    bucket's last incomplete batch waits for the next epoch's order), the batches of every bucket in
    a random order. The order depends only on the seed, so every host computes the same one and a
    resumed run continues it."""

    def __init__(self, bucket_of: np.ndarray, global_batch: int, seed: int, num_epochs: int | None):
        super().__init__()
        self._bucket_of, self._b, self._seed = np.asarray(bucket_of), global_batch, seed
        counts = np.bincount(self._bucket_of)
        self._epoch_length = int(sum(c // global_batch for c in counts)) * global_batch
        self._epochs = num_epochs

    def __len__(self) -> int:
        return self._epoch_length * self._epochs if self._epochs else sys.maxsize

    @functools.lru_cache(maxsize=2)
    def epoch(self, e: int) -> np.ndarray:
        """Epoch ``e``'s source indices in stream order."""
        rng = np.random.default_rng([self._seed, e, 11])
        batches = []
        for k in range(int(self._bucket_of.max()) + 1):
            members = rng.permutation(np.flatnonzero(self._bucket_of == k))
            full = len(members) // self._b * self._b
            batches += list(members[:full].reshape(-1, self._b))
        return np.concatenate([batches[i] for i in rng.permutation(len(batches))]) if batches else np.zeros(0, int)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        e, r = divmod(index, self._epoch_length)
        i = int(self.epoch(e)[r])
        return i, int(self._bucket_of[i])

    def __str__(self) -> str:
        return f"_BucketOrder(global_batch={self._b}, epoch_length={self._epoch_length})"


def _image_sizes(ds: grain.MapDataset, config: DataConfig) -> np.ndarray:
    """(height, width) of every example, read once (in ``config.num_threads`` threads)."""
    from concurrent.futures import ThreadPoolExecutor

    def size(i: int) -> tuple[int, int]:
        return tuple(np.shape(_lookup(ds[i], config.image_key))[:2])

    with ThreadPoolExecutor(max(1, config.num_threads)) as pool:
        return np.asarray(list(pool.map(size, range(len(ds)))), np.int64).reshape(-1, 2)


def bucket_batches(ds: grain.MapDataset, config: DataConfig,
                   tokenize: Callable[[str], Sequence[int]] | None = None) -> "GlobalBatchIterator":
    """``data.buckets`` for a dataset read by index (an image folder, a TFDS dataset): every image
    goes to the bucket of nearest aspect ratio (``sdjax.data.buckets``), each global batch is one
    bucket's, resized to cover it and cropped (``_BucketOrder`` gives the order). Each host decodes
    every image once at the start to learn its size; the log gives each bucket's count."""
    t0 = time.perf_counter()
    sizes = buckets_lib.parse(config.buckets, config.image_size)
    hw = _image_sizes(ds, config)
    bucket_of = np.asarray([buckets_lib.nearest(sizes, int(h), int(w)) for h, w in hw])
    global_batch = config.batch_size * config.shard()[1]
    order = _BucketOrder(bucket_of, global_batch, config.seed, config.num_epochs)
    counts = np.bincount(bucket_of, minlength=len(sizes))
    if jax.process_index() == 0:
        print(f"data.buckets: {len(ds)} images sized in {time.perf_counter() - t0:.1f} s; "
              + ", ".join(f"{h}x{w}: {n}" for (h, w), n in zip(sizes, counts))
              + f"; {order._epoch_length} per epoch in global batches of {global_batch}", flush=True)
    if order._epoch_length == 0:
        raise ValueError(f"data.buckets: no bucket holds a whole global batch of {global_batch} images "
                         f"({', '.join(f'{h}x{w}: {n}' for (h, w), n in zip(sizes, counts))}); use fewer buckets or a "
                         "smaller train.batch_size.")

    stream = order.seed(config.seed).random_map(
        functools.partial(_bucketed, source=ds, config=config, tokenize=tokenize, sizes=sizes))
    return GlobalBatchIterator(stream, config, drop_remainder=True)


def _bucketed(element: tuple[int, int], rng: np.random.Generator, source: grain.MapDataset, config: DataConfig,
              tokenize: Callable[[str], Sequence[int]] | None, sizes: Sequence[tuple[int, int]]) -> dict:
    i, k = element
    return preprocess(source[i], rng, config, tokenize, sizes[k])


# ---- global batches -----------------------------------------------------------------------------


class _HostRows(grain.MapDataset):
    """Host ``h`` of ``n``'s rows of each global batch of ``parent`` (from element ``start`` on):
    rows [h*b, (h+1)*b) of every run of n*b consecutive elements."""

    def __init__(self, parent: grain.MapDataset, start: int, host_batch: int, shard: tuple[int, int],
                 drop_remainder: bool):
        super().__init__(parent)
        self._start, self._b = start, host_batch
        self._host, count = shard
        self._global = host_batch * count
        full, rem = divmod(max(len(parent) - start, 0), self._global)
        tail = 0 if drop_remainder else min(max(rem - self._host * host_batch, 0), host_batch)
        self._length = full * host_batch + tail

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._b)
        return self._parent[self._start + batch * self._global + self._host * self._b + row]

    def __str__(self) -> str:
        return f"_HostRows(start={self._start}, host_batch={self._b}, global_batch={self._global})"


class GlobalBatchIterator(grain.DatasetIterator):
    """This host's part of each global batch of a MapDataset: host i of n yields rows
    [i*b, (i+1)*b) of every global batch of n*b elements, so the global batch (the hosts' batches
    concatenated in process order) is the same for any number of hosts. Its state is the position
    in the global stream, so a run resumes with another number of hosts too."""

    def __init__(self, ds: grain.MapDataset, config: "DataConfig", drop_remainder: bool = True):
        super().__init__()
        self._ds, self._config, self._drop_remainder = ds, config, drop_remainder
        self._next = 0  # the global index of the next global batch's first element

    @functools.cached_property
    def _iterator(self) -> grain.DatasetIterator:
        c = self._config
        rows = _HostRows(self._ds, self._next, c.batch_size, c.shard(), self._drop_remainder)
        it_ds = rows.to_iter_dataset(grain.ReadOptions(num_threads=c.num_threads,
                                                       prefetch_buffer_size=2 * c.batch_size))
        it_ds = it_ds.batch(c.batch_size, drop_remainder=self._drop_remainder)
        if c.num_workers:
            # Grain's worker processes read absl flags; scripts not run by absl.app have parsed none.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.num_workers))
        return iter(it_ds)

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self._next += self._config.batch_size * self._config.shard()[1]
        return batch

    def get_state(self) -> dict:
        return {"global_next_index": self._next}

    def set_state(self, state: dict) -> None:
        self._next = int(state["global_next_index"])
        self.close()

    def close(self) -> None:
        if "_iterator" in self.__dict__:
            self.__dict__.pop("_iterator").close()


def global_batches(ds: grain.MapDataset, config: "DataConfig", transform: Callable | None = None,
                   drop_remainder: bool = True) -> GlobalBatchIterator:
    """``ds`` shuffled by ``config.seed`` (one permutation per epoch), repeated ``config.num_epochs``
    times, each element through ``transform(element, rng)`` (the rng keyed by the element's
    global index), as this host's batches (``GlobalBatchIterator``)."""
    ds = ds.seed(config.seed)
    if config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(config.num_epochs)
    if transform is not None:
        ds = ds.random_map(transform)
    return GlobalBatchIterator(ds, config, drop_remainder)


def iterator_save_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointSave:
    """Orbax args saving the iterator's position, e.g. inside `ocp.args.Composite(data=...)`.

    One JSON file per process, so every host resumes its own shard.
    """
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointRestore:
    """Orbax args restoring a saved position into `iterator` (built from the same config)."""
    return grain.checkpoint.CheckpointRestore(iterator)


def iterator_handler() -> grain.checkpoint.CheckpointHandler:
    """The Orbax handler of those args, for a checkpoint manager that names its items' handlers."""
    return grain.checkpoint.CheckpointHandler()
