"""Data pipeline tests: tiny prepared datasets in a tmp data_dir, read back through grain."""

import collections
import dataclasses
import io
import json
import re
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from sdjax import data

NUM_TRAIN = 48
SEQ_LEN = 77


def _tokenize(text: str) -> list[int]:
    ids = [ord(c) for c in text[:SEQ_LEN]]
    return ids + [0] * (SEQ_LEN - len(ids))


def _to_uint8(image_f32: np.ndarray) -> np.ndarray:
    return np.rint((image_f32 + 1.0) * 127.5).astype(np.uint8)


def _take(config: data.DataConfig, num_batches: int | None = None) -> list[dict]:
    it = data.make_dataset(config)
    return list(it) if num_batches is None else [next(it) for _ in range(num_batches)]


def _assert_batches_equal(a: list[dict], b: list[dict]):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["text"], y["text"])


@pytest.fixture(scope="module")
def shapes_config(tmp_path_factory) -> data.DataConfig:
    config = data.DataConfig(data_dir=str(tmp_path_factory.mktemp("tfds")), num_examples=NUM_TRAIN,
                             batch_size=8, shard_index=0, shard_count=1)
    data.prepare(config)
    return config


def test_render_shape_matches_closed_form_geometry():
    red, blue = data.COLOR_NAMES.index("red"), data.COLOR_NAMES.index("blue")
    square = data.render_shape(data.SHAPES.index("square"), red, blue, 8, 16, 16, 32)
    assert square.shape == (32, 32, 3) and square.dtype == np.uint8
    is_red = (square == data.COLORS["red"]).all(-1)
    assert (is_red | (square == data.COLORS["blue"]).all(-1)).all()
    rows, cols = np.nonzero(is_red)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (12, 19, 12, 19) and is_red.sum() == 64
    circle = data.render_shape(data.SHAPES.index("circle"), red, blue, 40, 50, 50, 100)
    np.testing.assert_allclose((circle == data.COLORS["red"]).all(-1).sum(), np.pi * 20**2, rtol=0.02)
    triangle = (data.render_shape(data.SHAPES.index("triangle"), red, blue, 40, 50, 50, 100)
                == data.COLORS["red"]).all(-1)
    np.testing.assert_allclose(triangle.sum(), 40 * 40 / 2, rtol=0.05)
    widths = triangle.sum(1)[30:70]
    assert widths[0] <= 2 and widths[-1] >= 38 and (np.diff(widths) >= 0).all()  # Apex up.


def test_batches_have_expected_shapes_dtypes_and_ranges(shapes_config):
    batch = next(data.make_dataset(shapes_config, tokenize=_tokenize))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["text"].shape == (8,) and all(isinstance(t, str) for t in batch["text"].tolist())
    assert batch["input_ids"].shape == (8, SEQ_LEN) and batch["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["input_ids"][0], _tokenize(str(batch["text"][0])))


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_and_labels_match_rendered_pixels(shapes_config, split):
    config = dataclasses.replace(shapes_config, split=split, num_epochs=1, batch_size=1,
                                 label_keys=("shape", "color", "background"))
    for batch in _take(config):
        text, image = str(batch["text"][0]), _to_uint8(batch["image"][0])
        color, shape, background = re.fullmatch(r"a (\w+) (\w+) on a (\w+) background", text).groups()
        assert (data.COLOR_NAMES[batch["color"][0]], data.SHAPES[batch["shape"][0]],
                data.COLOR_NAMES[batch["background"][0]]) == (color, shape, background)
        is_shape = (image == data.COLORS[color]).all(-1)
        assert (is_shape | (image == data.COLORS[background]).all(-1)).all(), text
        # The shape's fill of its bounding box tells the shape apart: 1, pi/4 or 1/2.
        rows, cols = np.nonzero(is_shape)
        fill = is_shape.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
        expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
        assert abs(fill - expected) < 0.12, (text, fill)
        if split == "train":
            assert (shape, color) not in data.HELDOUT_COMBOS


def test_shuffle_is_deterministic_per_seed(shapes_config):
    first = _take(shapes_config, 3)
    _assert_batches_equal(first, _take(shapes_config, 3))
    other = _take(dataclasses.replace(shapes_config, seed=1), 3)
    assert any((a["image"] != b["image"]).any() for a, b in zip(first, other))
    unshuffled = _take(dataclasses.replace(shapes_config, shuffle=False), 3)
    assert any((a["image"] != b["image"]).any() for a, b in zip(first, unshuffled))


def test_random_flip_mirrors_some_images(shapes_config):
    plain = _take(dataclasses.replace(shapes_config, num_epochs=1))
    flipped = _take(dataclasses.replace(shapes_config, num_epochs=1, random_flip=True))
    num_flipped = 0
    for a, b in zip(plain, flipped, strict=True):
        for x, y in zip(a["image"], b["image"]):
            mirrored = np.array_equal(y, x[:, ::-1])
            assert mirrored or np.array_equal(y, x)
            num_flipped += mirrored and not np.array_equal(x, x[:, ::-1])
    assert 0 < num_flipped < NUM_TRAIN


def test_hosts_read_their_rows_of_the_same_global_batches(shapes_config):
    """Host i of n yields rows [i*b, (i+1)*b) of each global batch: the hosts' batches, concatenated
    in process order, are one host's batches, over several epochs, whatever the number of hosts."""
    one = _take(dataclasses.replace(shapes_config, batch_size=12), 9)  # 48 examples: 4 batches per epoch
    for n in (2, 3):
        hosts = [_take(dataclasses.replace(shapes_config, batch_size=12 // n, shard_index=i, shard_count=n), 9)
                 for i in range(n)]
        for k, want in enumerate(one):
            np.testing.assert_array_equal(np.concatenate([h[k]["image"] for h in hosts]), want["image"])
            assert [t for h in hosts for t in h[k]["text"].tolist()] == want["text"].tolist()
    epoch = collections.Counter(t for b in one[:4] for t in b["text"].tolist())
    every = collections.Counter(str(data.builder(shapes_config).as_data_source("train")[i]["text"].decode())
                                for i in range(NUM_TRAIN))
    assert epoch == every  # one epoch holds every example once


def test_resume_on_another_number_of_hosts(shapes_config):
    one = data.make_dataset(dataclasses.replace(shapes_config, batch_size=12))
    for _ in range(5):
        next(one)
    state = one.get_state()
    want = next(one)
    hosts = [data.make_dataset(dataclasses.replace(shapes_config, batch_size=4, shard_index=i, shard_count=3))
             for i in range(3)]
    for h in hosts:
        h.set_state(state)
    np.testing.assert_array_equal(np.concatenate([next(h)["image"] for h in hosts]), want["image"])


def test_held_out_split_is_the_test_split_or_the_last_holdout_fraction(shapes_config, tmp_path):
    b = data.builder(shapes_config)
    assert data.splits(b, shapes_config) == ("train", "test")  # the dataset's own test split
    train = dataclasses.replace(shapes_config, split="train[:40]")  # as if it had no test split
    NestedCaptionsForTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    nested = data.DataConfig(name="nested_captions_for_test", data_dir=str(tmp_path), split="validation",
                             image_key="photo", text_key="captions/text", holdout=0.3)
    b = data.builder(nested)
    assert data.splits(b, nested) == ("validation[:-2]", "validation[-2:]")  # ceil(4 * 0.3) = 2 held out
    assert data.splits(b, dataclasses.replace(nested, holdout=0.01)) == ("validation[:-1]", "validation[-1:]")
    assert data.splits(data.builder(train), dataclasses.replace(train, eval_split="train[40:]")) == (
        "train[:40]", "train[40:]")


def test_config_section_is_every_field_and_typed():
    section = data.config_section(image_size=64)
    fields = {f.name for f in dataclasses.fields(data.DataConfig)} - {"batch_size"}
    assert set(section.keys()) == fields and section.image_size == 64
    section.manual_dir = "/some/folder"  # a None default still takes a string from the command line
    config = data.DataConfig.from_config(section, batch_size=4)
    assert config.manual_dir == "/some/folder" and config.batch_size == 4
    section = data.config_section()
    section.unlock()
    section.bogus = 1
    with pytest.raises(ValueError, match="data.bogus is not a data setting; valid keys: .*manual_dir"):
        data.DataConfig.from_config(section, batch_size=4)
    with pytest.raises(ValueError, match="data_dir=gs://b/d must be a local path: for data in a bucket, use "
                                         "data.name=webdataset"):
        data.DataConfig(data_dir="gs://b/d")
    with pytest.raises(ValueError, match="s3://b/d: sdjax reads and writes local paths and gs:// only"):
        data.DataConfig(manual_dir="s3://b/d")


def test_iterator_state_resumes_at_the_same_batch(shapes_config):
    it = data.make_dataset(shapes_config)
    for _ in range(7):  # Past the end of the first epoch (6 batches).
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = data.make_dataset(shapes_config)
    resumed.set_state(state)
    _assert_batches_equal(expected, [next(resumed) for _ in range(2)])


def test_iterator_state_round_trips_through_orbax(shapes_config, tmp_path):
    it = data.make_dataset(shapes_config)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=data.iterator_save_args(it)))
        mngr.wait_until_finished()
        expected = next(it)
        resumed = data.make_dataset(shapes_config)
        mngr.restore(3, args=ocp.args.Composite(data=data.iterator_restore_args(resumed)))
    _assert_batches_equal([expected], [next(resumed)])


def _save(path, array: np.ndarray, fmt: str):
    Image.fromarray(array).save(path, format=fmt)


def test_image_folder_skips_bad_entries_and_reports_them(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    good = {"red.png": (255, 0, 0), "green.jpg": (0, 255, 0), "gray.png": (128, 128, 128),
            "rgba.png": (0, 0, 255)}
    sizes = [(24, 40), (40, 24), (16, 16), (20, 30)]
    for (name, rgb), (h, w) in zip(good.items(), sizes):
        img = np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3))
        if name == "gray.png":
            img = img[..., 0]
        elif name == "rgba.png":
            img = np.concatenate([img, np.full((h, w, 1), 255, np.uint8)], -1)
        _save(folder / name, np.ascontiguousarray(img), "JPEG" if name.endswith("jpg") else "PNG")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _save(folder / "nocaption.png", noise, "PNG")
    entries = [{"file_name": n, "text": f"colour {n}"} for n in good]
    entries[2:2] = [{"file_name": "corrupt.png", "text": "x"}, {"file_name": "truncated.jpg", "text": "y"},
                    {"file_name": "nocaption.png"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")

    config = data.DataConfig(name="captioned_images", data_dir=str(tmp_path / "tfds"), manual_dir=str(folder),
                             image_size=16, batch_size=1, num_epochs=1, shard_index=0, shard_count=1)
    data.prepare(config)
    assert ("prepared 4 examples; skipped 2 unreadable images (corrupt.png, truncated.jpg), "
            "1 entry without caption (nocaption.png)") in capsys.readouterr().out
    data.prepare(config)  # Reuses the prepared files.
    assert "prepared" not in capsys.readouterr().out
    first = data.builder(config).info.config_name

    batches = _take(config)
    assert sorted(str(b["text"][0]) for b in batches) == sorted(f"colour {n}" for n in good)
    for b in batches:
        assert b["image"].shape == (1, 16, 16, 3)
        rgb = np.array(good[str(b["text"][0]).removeprefix("colour ")]) / 127.5 - 1.0
        np.testing.assert_allclose(b["image"][0], np.broadcast_to(rgb, (16, 16, 3)), atol=3 / 127.5)

    # A changed folder is prepared anew (never read stale), under another config name.
    _save(folder / "white.png", np.full((16, 16, 3), 255, np.uint8), "PNG")
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "white.png", "text": "colour white.png"}) + "\n")
    data.prepare(config)
    assert "prepared 5 examples" in capsys.readouterr().out
    assert data.builder(config).info.config_name != first and len(_take(config)) == 5


def test_image_folder_buckets_batch_each_aspect_ratio_apart_over_hosts_and_resume(tmp_path, capsys):
    """data.buckets on an image folder: 8 square and 9 wide images in two buckets; every global batch
    is one bucket's images, cropped to its size; two hosts read the rows of one host's global
    batches; a restored position continues the same batches."""
    from tests.helpers import write_image_folder

    folder = write_image_folder(tmp_path / "images", 17)  # odd i: 40x40 PNGs; even i: 32x48 (h x w) JPEGs
    one = data.DataConfig(name="captioned_images", data_dir=str(tmp_path / "tfds"), manual_dir=str(folder),
                          image_size=32, batch_size=4, buckets="32x32,24x40", shard_index=0, shard_count=1)
    data.prepare(one)
    capsys.readouterr()
    batches = _take(one, 8)
    out = capsys.readouterr().out
    assert "data.buckets: 17 images sized in" in out
    assert "32x32: 8, 24x40: 9; 16 per epoch in global batches of 4" in out
    for b in batches:  # each batch: one bucket's size, and only images of that aspect ratio
        want = {(24, 40): (32, 48), (32, 32): (40, 40)}[b["image"].shape[1:3]]
        assert [tuple(o) for o in b["original_size"]] == [want] * 4
    for epoch in (batches[:4], batches[4:]):  # 2 square and 2 wide batches; the 9th wide image waits
        assert sorted(b["image"].shape[1] for b in epoch) == [24, 24, 32, 32]

    hosts = [_take(dataclasses.replace(one, batch_size=2, shard_index=i, shard_count=2), 8) for i in range(2)]
    for whole, h0, h1 in zip(batches, *hosts):
        np.testing.assert_array_equal(np.concatenate([h0["image"], h1["image"]]), whole["image"])
        np.testing.assert_array_equal(np.concatenate([h0["text"], h1["text"]]), whole["text"])

    it = data.make_dataset(one)
    for _ in range(3):
        next(it)
    again = data.make_dataset(one)
    again.set_state(it.get_state())
    _assert_batches_equal([next(again) for _ in range(5)], batches[3:])

    with pytest.raises(ValueError, match="no bucket holds a whole global batch of 12 images"):
        data.make_dataset(dataclasses.replace(one, batch_size=12))


def test_bucket_order_is_whole_batches_of_one_bucket_each_image_once_per_epoch():
    from sdjax.data.pipeline import _BucketOrder

    bucket_of = np.repeat([0, 1, 2], [10, 7, 2])  # bucket 2 never fills a batch of 3
    order = _BucketOrder(bucket_of, 3, seed=5, num_epochs=None)
    assert order._epoch_length == 3 * 3 + 2 * 3
    epochs = [np.asarray([order[e * 15 + r][0] for r in range(15)]) for e in range(3)]
    for idx in epochs:
        assert len(set(idx.tolist())) == 15 and not set(idx.tolist()) & {17, 18}
        assert all(len(set(bucket_of[idx[b:b + 3]])) == 1 for b in range(0, 15, 3))
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch
    np.testing.assert_array_equal(epochs[0], [_BucketOrder(bucket_of, 3, 5, None)[r][0] for r in range(15)])
    assert len(_BucketOrder(bucket_of, 3, 5, 2)) == 30


class NestedCaptionsForTest(tfds.core.GeneratorBasedBuilder):
    """A COCO-like layout: several captions per image under a nested key."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "photo": tfds.features.Image(shape=(20, 30, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            yield i, {"photo": buf.getvalue(), "captions": {"text": [f"image {i}", f"picture {i}"]}}


def test_any_prepared_tfds_dataset_with_configured_keys(tmp_path):
    NestedCaptionsForTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = data.DataConfig(name="nested_captions_for_test", data_dir=str(tmp_path), split="validation",
                             image_key="photo", text_key="captions/text", image_size=16, random_crop=True,
                             batch_size=2, num_epochs=1, shard_index=0, shard_count=1)
    batches = _take(config)
    assert len(batches) == 2
    for b in batches:
        assert b["image"].shape == (2, 16, 16, 3)
        for text, image in zip(b["text"].tolist(), b["image"]):
            i = int(text.split()[1])
            assert text in (f"image {i}", f"picture {i}")
            np.testing.assert_allclose(image, 40 * i / 127.5 - 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="Unknown split 'train'"):
        data.make_dataset(dataclasses.replace(config, split="train"))
    assert len(_take(dataclasses.replace(config, split="validation[:50%]"))) == 1


def test_user_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="needs data.manual_dir"):
        data.prepare(data.DataConfig(name="captioned_images", data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        data.prepare(data.DataConfig(name="captioned_images", data_dir=str(tmp_path), manual_dir=str(tmp_path / "x")))
    with pytest.raises(FileNotFoundError, match="metadata.jsonl not found"):
        data.prepare(data.DataConfig(name="captioned_images", data_dir=str(tmp_path), manual_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"not prepared .* run sdjax.data.prepare\(config\) first"):
        data.make_dataset(data.DataConfig(data_dir=str(tmp_path), num_examples=3))


def test_reading_does_not_import_tensorflow(shapes_config):
    next(data.make_dataset(shapes_config))
    assert "tensorflow" not in sys.modules
