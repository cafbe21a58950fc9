"""Webdataset shards read in place: file patterns, per-host files, bad samples, exact resume."""

import collections
import io
import json
import tarfile

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from helpers import write_webdataset
from sdjax import data
from sdjax.data import webdataset

SHARDS, PER_SHARD = 4, 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wds")
    return folder, write_webdataset(folder, SHARDS, PER_SHARD)


def _config(folder, **kw) -> data.DataConfig:
    values = dict(name="webdataset", files=f"{folder}/{{00000..{SHARDS - 1:05d}}}.tar", image_size=16, batch_size=4,
                  shuffle_buffer=5, interleave=2, num_threads=2, shard_index=0, shard_count=1)
    return data.DataConfig(**dict(values, **kw))


def _written(folder, shard: int) -> list[tuple[str, str]]:
    """(key, caption) of every good sample of a shard, read with Python's tarfile (not the reader)."""
    out, members = [], {}
    try:
        with tarfile.open(folder / f"{shard:05d}.tar") as tar:
            for m in tar:
                name = m.name
                members[name] = tar.extractfile(m).read()
    except tarfile.ReadError:  # the truncated shard: the sample the cut member belongs to is lost
        members = {k: v for k, v in members.items() if k.split(".")[0] != name.split(".")[0]}
    for name, payload in members.items():
        key, ext = name.split(".", 1)
        if ext == "txt" and not key.startswith("00000999") and (f"{key}.png" in members or f"{key}.jpg" in members):
            out.append((key, payload.decode()))
    return out


def test_patterns_expand_to_sorted_files_and_bad_ones_are_named(shards, tmp_path):
    folder, paths = shards
    want = [str(p) for p in paths]
    assert webdataset.expand(f"{folder}/{{00000..00003}}.tar") == want
    assert webdataset.expand(f"{folder}/*.tar") == want
    assert webdataset.expand(f"{folder}/00003.tar, {folder}/0000{{0,1}}.tar,{folder}/00002.tar") == want
    with pytest.raises(FileNotFoundError, match=r"nothing\*.tar matches no file"):
        webdataset.expand(f"{folder}/nothing*.tar")
    with pytest.raises(ValueError, match="x.tar.gz is not an uncompressed .tar shard"):
        webdataset.expand(f"{folder}/x.tar.gz")
    with pytest.raises(FileNotFoundError, match=r"2 of 6 shards are missing, e.g. .*00004.tar, .*00005.tar"):
        webdataset.Shards.find(f"{folder}/{{00000..00005}}.tar")
    with pytest.raises(ValueError, match="data.name=webdataset reads the shards of data.files"):
        data.DataConfig(name="webdataset")
    with pytest.raises(ValueError, match="leave num_epochs unset"):
        _config(folder, num_epochs=1)
    with pytest.raises(ValueError, match="has 4 shards for 5 hosts"):
        next(data.make_dataset(_config(folder, shard_index=0, shard_count=5)))


def test_hosts_read_every_good_sample_once_per_epoch_and_skip_bad_ones(shards, capsys):
    folder, _ = shards
    good = {key: text for s in range(SHARDS) for key, text in _written(folder, s)}
    assert len(good) == SHARDS * PER_SHARD - 1  # the truncated shard lost its last sample
    seen = collections.Counter()
    for host in range(2):
        config = _config(folder, shard_index=host, shard_count=2, batch_size=1, shuffle_buffer=1)
        stream = webdataset.SampleStream(webdataset.expand(config.files), config.seed, host, 2, config.interleave,
                                         config.shuffle_buffer, lambda *a: None)
        # Epoch 0: this host's files (a (seed, epoch) permutation, every second one) in full.
        files = webdataset.host_files(webdataset.expand(config.files), config.seed, 0, host, 2)
        n = sum(len(_written(folder, i)) + 2 * (i == 0) for i in files)  # shard 0 also holds two bad samples
        keys = [next(stream)["__key__"] for _ in range(n)]
        assert stream.state.epoch == 0 and len(set(keys)) == n
        seen.update(k for k in keys if k in good)
        stream.close()
    assert seen == collections.Counter(good.keys())

    # Through the iterator: the bad samples are skipped and reported with their shard.
    it = data.make_dataset(_config(folder, batch_size=8, shuffle_buffer=3))
    texts = [t for _ in range(6) for t in next(it)["text"]]
    log = capsys.readouterr().out
    assert "skipped 00000.tar:0000099990: undecodable image" in log
    assert "skipped 00000.tar:0000099991: no caption" in log
    assert "skipped 00003.tar:?: truncated or corrupt shard" in log
    assert set(texts) <= set(good.values())
    counts = {r: sum(c.values()) for r, c in it.skipped.items()}  # per shard, over the epochs read
    epochs = counts[str(folder / "00003.tar")]
    assert epochs >= 1 and counts == {str(folder / "00000.tar"): 2 * epochs, str(folder / "00003.tar"): epochs}


def test_examples_carry_pixels_caption_and_original_size(shards):
    folder, _ = shards
    batch = next(data.make_dataset(_config(folder, batch_size=6, shuffle_buffer=1, interleave=1),
                                   tokenize=lambda t: [len(t)] * 3))
    assert batch["image"].shape == (6, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["input_ids"].shape == (6, 3) and (batch["input_ids"][:, 0] == [len(t) for t in batch["text"]]).all()
    # The writer's JSON gives the original size as 10x the stored image: (h, w) in (32|48) * 10.
    assert {tuple(s) for s in batch["original_size"]} <= {(320, 320), (320, 480), (480, 320)}
    # Centre crops of the 16-px-short side: a wide image is cropped (8 - 0)/2 * ... from the left.
    for size, (top, left) in zip(batch["original_size"], batch["crop_top_left"]):
        h, w = size // 10
        assert (top, left) == ((round(h * 16 / min(h, w)) - 16) // 2, (round(w * 16 / min(h, w)) - 16) // 2)


def test_position_resumes_exactly_through_orbax(shards, tmp_path):
    folder, _ = shards
    config = _config(folder, random_crop=True, random_flip=True)
    straight = data.make_dataset(config)
    want = [next(straight) for _ in range(14)]  # over three epochs of this host's shards
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    it = data.make_dataset(config)
    for step in range(5):
        next(it)
    manager.save(5, args=ocp.args.Composite(data=data.iterator_save_args(it)))
    manager.wait_until_finished()
    resumed = data.make_dataset(config)
    manager.restore(5, args=ocp.args.Composite(data=data.iterator_restore_args(resumed)))
    for step in range(5, 14):
        got = next(resumed)
        for k in want[step]:
            np.testing.assert_array_equal(got[k], want[step][k], err_msg=f"batch {step} {k}")
    assert resumed.get_state()["epoch"] >= 2
    other = data.make_dataset(_config(folder, shard_index=0, shard_count=2))
    with pytest.raises(ValueError, match="4 shards over 1 hosts; this run has 4 over 2"):
        other.set_state(it.get_state())


def test_decode_reads_json_sizes_and_names_bad_members():
    buf = io.BytesIO()
    Image.new("RGB", (5, 3), (1, 2, 3)).save(buf, format="PNG")
    image, caption, size = webdataset.decode({"png": buf.getvalue(), "txt": b" a cat ", "json": json.dumps(
        {"original_width": 50, "original_height": 30}).encode()}, "txt")
    assert image.shape == (3, 5, 3) and (image == [1, 2, 3]).all() and caption == "a cat" and size == (30, 50)
    assert webdataset.decode({"png": buf.getvalue(), "caption": b"x"}, "caption")[2] == (3, 5)
    for sample, reason in (({"txt": b"x"}, "no image member"), ({"png": buf.getvalue()}, "no caption"),
                           ({"jpg": b"\xff\xd8 no", "txt": b"x"}, "undecodable image")):
        with pytest.raises(ValueError, match=reason):
            webdataset.decode(sample, "txt")


def test_auto_buckets_follow_the_pixel_budget_and_images_go_to_the_nearest_ratio():
    from sdjax.data import buckets

    auto = buckets.auto(512)
    assert (512, 512) in auto and (448, 576) in auto and (576, 448) in auto
    assert all(h % 64 == 0 and w % 64 == 0 and 256 <= min(h, w) and max(h, w) <= 1024 and h * w <= 512 ** 2
               for h, w in auto)
    assert {(w, h) for h, w in auto} == set(auto)  # every landscape bucket has its portrait twin
    pairs = buckets.parse("512x512, 384x640", 512)
    assert pairs == ((512, 512), (384, 640))
    assert buckets.nearest(pairs, 300, 500) == 1 and buckets.nearest(pairs, 500, 480) == 0
    with pytest.raises(ValueError, match="give 'auto' or \\(height, width\\) pairs"):
        buckets.parse("512 by 512", 512)
    assert [buckets.draw(0, s, [3, 0, 5]) for s in range(20)] == [buckets.draw(0, s, [3, 0, 5]) for s in range(20)]
    assert 1 not in {buckets.draw(0, s, [3, 0, 5]) for s in range(50)}


def test_bucketed_batches_share_one_shape_and_resume_exactly(shards, tmp_path):
    folder, _ = shards
    # The writer's images are 32x32, 32x48 and 48x32: three buckets of 16-px area budget.
    config = _config(folder, buckets="16x16,16x24,24x16", batch_size=2, random_crop=True)
    straight = data.make_dataset(config)
    want = [next(straight) for _ in range(12)]
    shapes = {b["image"].shape for b in want}
    assert shapes == {(2, 16, 16, 3), (2, 16, 24, 3), (2, 24, 16, 3)}
    for b in want:  # each image in the bucket of its own aspect ratio
        for (h, w), img in zip(b["original_size"], b["image"]):
            assert (h > w, h < w) == (img.shape[0] > img.shape[1], img.shape[0] < img.shape[1])
    it = data.make_dataset(config)
    for _ in range(5):
        next(it)
    resumed = data.make_dataset(config)
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    assert any(it.get_state()["queued"])  # samples were waiting in their buckets
    for step in range(5, 12):
        got = next(resumed)
        for k in want[step]:
            np.testing.assert_array_equal(got[k], want[step][k], err_msg=f"batch {step} {k}")
