"""Cloud Storage paths against an emulator (fake-gcs-server on localhost, ``conftest.gcs``)."""

import json
import shutil

import jax
import numpy as np
import pytest

from helpers import write_webdataset
from sdjax import data, paths


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDJAX_CACHE", str(tmp_path / "cache"))


def test_files_and_folders_round_trip_and_a_new_version_is_fetched_again(gcs, tmp_path):
    bucket = gcs.bucket("roundtrip")
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"a": 1}))
    (folder / "sub" / "w.bin").write_bytes(b"\x00" * 1000)
    paths.upload(str(folder), f"{bucket}/m", last=("model_index.json",))
    local = paths.readable(f"{bucket}/m", "checkpoint")
    assert json.loads(open(f"{local}/model_index.json").read()) == {"a": 1}
    assert open(f"{local}/sub/w.bin", "rb").read() == b"\x00" * 1000
    # Same size, new content: the copy is refreshed (the object's generation changed).
    (folder / "sub" / "w.bin").write_bytes(b"\x01" * 1000)
    paths.upload(str(folder), f"{bucket}/m")
    assert open(f"{paths.readable(f'{bucket}/m', 'checkpoint')}/sub/w.bin", "rb").read() == b"\x01" * 1000
    assert paths.glob(f"{bucket}/m/*.json") == [f"{bucket}/m/model_index.json"]
    with pytest.raises(FileNotFoundError, match="gs://roundtrip/nothing: no such object or folder"):
        paths.readable(f"{bucket}/nothing", "checkpoint")
    with pytest.raises(ValueError, match="s3://x/y: sdjax reads and writes local paths and gs:// only"):
        paths.check("s3://x/y", "--workdir")


def test_webdataset_shards_in_a_bucket_read_like_local_ones(gcs, tmp_path):
    bucket = gcs.bucket("shards")
    local = write_webdataset(tmp_path / "wds", 3, 4, bad=False)
    for p in local:
        paths.upload(str(p), f"{bucket}/laion/{p.name}")
    common = dict(name="webdataset", image_size=16, batch_size=4, shuffle_buffer=3, interleave=2, shard_index=0,
                  shard_count=1)
    want = data.make_dataset(data.DataConfig(files=f"{tmp_path}/wds/{{00000..00002}}.tar", **common))
    got = data.make_dataset(data.DataConfig(files=f"{bucket}/laion/{{00000..00002}}.tar", **common))
    for _ in range(4):
        a, b = next(want), next(got)
        np.testing.assert_array_equal(a["image"], b["image"])
        assert list(a["text"]) == list(b["text"])
    assert [s.split("/")[-1] for s in data.webdataset.expand(f"{bucket}/laion/*.tar")] == [p.name for p in local]
    with pytest.raises(FileNotFoundError, match="1 of 4 shards are missing, e.g. gs://shards/laion/00003.tar"):
        data.webdataset.Shards.find(f"{bucket}/laion/{{00000..00003}}.tar")


def test_exports_in_every_format_and_sampling_outputs_live_in_the_bucket(gcs, tmp_path):
    import tiny_models
    from sdjax.checkpoints import export
    from sdjax.cli import sample as sample_cli
    from sdjax.stable_diffusion import StableDiffusion

    bucket = gcs.bucket("models")
    sd = StableDiffusion.from_pretrained(str(tiny_models.save_pipeline(tmp_path / "pipe", "sd1", seed=2)))
    for fmt, name in (("sdjax", "m-sdjax"), ("diffusers", "m-diffusers")):
        export.save(f"{bucket}/{name}", sd.configs, sd.params, sd.tokenizer_dir, format=fmt)
        back = StableDiffusion.from_pretrained(f"{bucket}/{name}")
        for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(back.params)[0], jax.tree.leaves(sd.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{fmt} {jax.tree_util.keystr(k)}")
    # A single file goes up whole: the same bytes as a local export.
    export.save(f"{bucket}/m.safetensors", sd.configs, sd.params, format="single_file")
    export.save(str(tmp_path / "m.safetensors"), sd.configs, sd.params, format="single_file")
    assert open(paths.readable(f"{bucket}/m.safetensors", "checkpoint"), "rb").read() == \
        (tmp_path / "m.safetensors").read_bytes()
    # A diffusers export never replaces something else in the bucket.
    paths.upload(str(tmp_path / "pipe" / "model_index.json"), f"{bucket}/other/notes.json")
    with pytest.raises(FileExistsError, match="gs://models/other exists and is not a diffusers folder"):
        export.save(f"{bucket}/other", sd.configs, sd.params, sd.tokenizer_dir, format="diffusers")

    written = sample_cli.main(["--checkpoint", f"{bucket}/m-diffusers", "--prompt", "a red circle", "--steps", "2",
                               "--H", "16", "--W", "16", "--n-samples", "2", "--out", f"{bucket}/outputs"])
    assert sorted(p.rsplit("/", 1)[-1] for p in paths.glob(f"{bucket}/outputs/*")) == [
        "00000-a_red_circle.json", "00000-a_red_circle.png", "00001-a_red_circle.json", "00001-a_red_circle.png",
        "grid-0000.png"]
    assert written[0] == f"{bucket}/outputs/00000-a_red_circle.png"


def test_latent_cache_in_a_bucket_is_encoded_once_and_read_back(gcs, tmp_path, monkeypatch):
    from sdjax.data import latent_cache

    bucket = gcs.bucket("cache")
    monkeypatch.setattr(latent_cache, "CHUNK", 4)
    n, asked = 10, []

    def examples(start, stop):
        asked.append((start, stop))
        idx = np.arange(start, stop, dtype=np.float32)
        return {"image": np.broadcast_to(idx[:, None, None, None], (stop - start, 2, 2, 3)),
                "input_ids": np.repeat(np.arange(start, stop, dtype=np.int32)[:, None], 5, axis=1)}

    def encode(batch):
        images = batch["image"]
        return {"moments": np.concatenate([images[:, :1, :1, :1], 2 * images[:, :1, :1, :1]], axis=-1)}

    def build(fingerprint):
        return latent_cache.build(f"{bucket}/lc", fingerprint, n, examples, encode, 3, "test")

    source = build({"v": 1})
    assert asked == [(0, 4), (4, 8), (8, 10)]
    got = np.stack([source[i]["moments"][0, 0] for i in range(n)])
    np.testing.assert_array_equal(got, np.stack([np.arange(n), 2 * np.arange(n)], -1))
    assert len(paths.glob(f"{bucket}/lc/*.npy")) == 6
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # another host: nothing local, everything from the bucket
    assert len(build({"v": 1})) == n and len(asked) == 3
    build({"v": 2})  # stale: encoded anew
    assert len(asked) == 6


def test_eval_captions_are_read_from_the_bucket(gcs, tmp_path):
    """MLPerf's caption TSV and a folder's metadata.jsonl, each in a bucket, read as the local files are."""
    from sdjax.evaluation import captions

    bucket = gcs.bucket("captions")
    (tmp_path / "val2014_30k.tsv").write_text("id\timage_id\tcaption\n391895\t9000\ta red circle\n")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "0001.png", "text": "a cat"}\n')
    for name in ("val2014_30k.tsv", "metadata.jsonl"):
        paths.upload(str(tmp_path / name), f"{bucket}/coco/{name}")
    assert captions.read(f"{bucket}/coco/val2014_30k.tsv") == [captions.Caption("391895", "a red circle")]
    assert captions.read(f"{bucket}/coco/metadata.jsonl") == [captions.Caption("0001.png", "a cat")]
    with pytest.raises(FileNotFoundError, match="no such object"):
        captions.read(f"{bucket}/coco/missing/metadata.jsonl")
