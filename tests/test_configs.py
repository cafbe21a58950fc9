"""The real training configs (sd15_finetune, sd2_base, kl_f8): each one's tiny variant trains through
the command line on a tiny checkpoint or the shapes set, and bad input stops it before compiling."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sdjax import configs
from sdjax.stable_diffusion import StableDiffusion
from sdjax.training import latent
from tests import tiny_models
from tests.helpers import free_port, logs_tail, subprocess_env, write_image_folder

BIN = os.path.dirname(sys.executable)


def _train(args: list[str], cwd) -> str:
    env = subprocess_env()
    r = subprocess.run([os.path.join(BIN, "sdjax-train")] + [str(a) for a in args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _train_on_two_processes(args: list[str], cwd) -> list[str]:
    """The same ``sdjax-train`` command as processes 0 and 1 of a two-process run; what each printed."""
    port = free_port()
    procs = [subprocess.Popen([os.path.join(BIN, "sdjax-train")] + [str(a) for a in args], cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=subprocess_env(SDJAX_COORDINATOR=f"localhost:{port}", SDJAX_NUM_PROCESSES="2",
                                                 SDJAX_PROCESS_ID=str(i))) for i in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs_tail(logs)
    return logs


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("own") / "images", 12)


@pytest.mark.slow
def test_sd15_finetune_tiny_starts_from_the_checkpoint_and_keeps_its_frozen_parts(images, tmp_path):
    folder = tiny_models.save_pipeline(tmp_path / "sd1", "sd1", seed=0)
    out = _train(["latent", "--config", "sd15_finetune:tiny", "--workdir", tmp_path / "w", "--export", tmp_path / "e",
                  f"--config.pretrained={folder}", f"--config.data.manual_dir={images}",
                  f"--config.data.data_dir={tmp_path / 'tfds'}"], tmp_path)
    assert "step 4/4" in out
    base, tuned = StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(tmp_path / "e")
    assert tuned.configs == base.configs  # architecture and scheduler from the checkpoint
    assert tuned.tokenizer.get_vocab() == base.tokenizer.get_vocab()
    for name in ("vae", "text_encoder"):  # frozen: bit for bit
        for k, v in _flat(base.params[name]).items():
            np.testing.assert_array_equal(_flat(tuned.params[name])[k], v, err_msg=name + k)
    # The UNet started from the checkpoint's: 4 Adam steps at 1e-5 move a weight by at most ~4e-5
    # (a random start would differ by O(0.1)), and training did move it.
    diff = max(np.abs(_flat(tuned.params["unet"])[k] - v).max() for k, v in _flat(base.params["unet"]).items())
    assert 0 < diff < 5e-5
    assert len(list((tmp_path / "w" / "samples").glob("samples_*.png"))) == 2


@pytest.mark.slow
def test_sd2_base_tiny_trains_a_new_unet_on_the_frozen_sd2_parts(images, tmp_path):
    folder = tiny_models.save_pipeline(tmp_path / "sd2", "sd2", seed=1)
    out = _train(["latent", "--config", "sd2_base:tiny", "--workdir", tmp_path / "w", "--export", tmp_path / "e",
                  f"--config.pretrained={folder}", f"--config.data.manual_dir={images}",
                  f"--config.data.data_dir={tmp_path / 'tfds'}"], tmp_path)
    assert "step 4/4" in out and "training on 12 cached latents" in out  # from precomputed latents
    base, trained = StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(tmp_path / "e")
    assert trained.configs.scheduler.prediction_type == "v_prediction"
    assert trained.configs.vae.scaling_factor == 0.18215
    assert trained.configs.unet.cross_attention_dim == base.configs.text_encoder.hidden_size == 48
    for name in ("vae", "text_encoder"):
        for k, v in _flat(base.params[name]).items():
            np.testing.assert_array_equal(_flat(trained.params[name])[k], v, err_msg=name + k)
    # No EMA (as MLPerf's reference): the export holds the trained weights of the last checkpoint, and
    # the UNet is a new one (a random start, far from the checkpoint's).
    import orbax.checkpoint as ocp
    path = str(tmp_path / "w" / "checkpoints" / "4" / "state")
    saved = ocp.PyTreeCheckpointer().restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree))
    assert saved["ema_params"] is None
    for k, v in _flat(saved["params"]["unet"]).items():
        np.testing.assert_array_equal(_flat(trained.params["unet"])[k], v, err_msg=k)
    assert max(np.abs(_flat(trained.params["unet"])[k] - v).max() for k, v in _flat(base.params["unet"]).items()) > 0.1


@pytest.mark.slow
def test_kl_f8_tiny_trains_with_the_gan_and_exports(tmp_path):
    out = _train(["autoencoder", "--config", "kl_f8:tiny", "--workdir", tmp_path / "w", "--export", tmp_path / "e",
                  f"--config.data.data_dir={tmp_path / 'tfds'}"], tmp_path)
    assert "step 4/4" in out and "held-out PSNR" in out
    from sdjax.checkpoints.load import load_vae
    config, params = load_vae(str(tmp_path / "e"))
    assert config.block_out_channels == (8, 16, 16, 16) and config.downsample_factor == 8
    assert config.scaling_factor != 1.0  # measured
    import json
    metrics = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    disc = {m["step"]: m["disc_factor"] for m in metrics if "disc_factor" in m}
    assert disc[1] == disc[2] == 0.0 and disc[4] == 1.0  # the GAN switched on at disc_start=3


def test_bad_input_stops_before_compiling(tmp_path):
    c = configs.load("sd15_finetune:tiny")
    with pytest.raises(ValueError, match="Set pretrained=PATH"):
        latent.build(c, str(tmp_path), devices=jax.devices()[:1])
    (tmp_path / "notsd").mkdir()
    (tmp_path / "notsd" / "weights.bin").write_bytes(b"x")
    c.pretrained = str(tmp_path / "notsd")
    with pytest.raises(ValueError, match="not a checkpoint sdjax can read"):
        latent.build(c, str(tmp_path), devices=jax.devices()[:1])
    c.pretrained = "s3://bucket/sd15"
    with pytest.raises(ValueError, match="local paths and gs:// only"):
        latent.build(c, str(tmp_path), devices=jax.devices()[:1])
    folder = tiny_models.save_pipeline(tmp_path / "sd1", "sd1", seed=0)
    c = configs.load("sd15_finetune:tiny")
    c.pretrained, c.data.image_size = str(folder), 30
    with pytest.raises(ValueError, match="image_size=30 must be a multiple of 4"):
        latent.build(c, str(tmp_path), devices=jax.devices()[:1])
    c = configs.load("sd15_finetune:tiny")
    c.pretrained, c.train.init_from = str(folder), str(folder)
    with pytest.raises(ValueError, match="unset train.init_from"):
        latent.build(c, str(tmp_path), devices=jax.devices()[:1])


def test_sdxl_bad_input_stops_before_compiling(tmp_path):
    c = configs.load("sdxl_finetune:tiny")
    c.pretrained = str(tiny_models.save_sdxl_pipeline(tmp_path / "refiner", refiner=True))
    with pytest.raises(ValueError, match="This is SDXL's refiner"):
        latent.build(c, str(tmp_path), devices=jax.devices()[:1])
    c = configs.load("sdxl_finetune:tiny")
    c.lora.update(rank=4, text_encoders=True, dropout=0.1)
    with pytest.raises(ValueError, match="set lora.dropout=0 with lora.text_encoders=True"):
        latent.build(c, str(tmp_path), devices=jax.devices()[:1])
    c = configs.load("sdxl_finetune:tiny")
    c.train.cache_text = True
    with pytest.raises(ValueError, match="set train.cache_latents=True too"):
        latent.build(c, str(tmp_path), devices=jax.devices()[:1])
    c.train.cache_latents = True
    c.lora.update(rank=4, text_encoders=True)
    with pytest.raises(ValueError, match="lora.text_encoders trains adapters in them"):
        latent.build(c, str(tmp_path), devices=jax.devices()[:1])


@pytest.mark.slow
def test_encode_webdataset_to_mlperf_latent_shards_then_sd2_base_trains_on_them(tmp_path):
    """``sdjax-train encode`` on two processes, as on a pod: each encodes its own image shard into a
    latent shard in MLPerf's layout (moments channels first), equal to diffusers' PyTorch encoder on
    the centre crops; a re-run skips the shards already done; ``sd2_base:tiny`` then trains on the
    latent shards read in place (``data.moments_ext=npy``)."""
    import io
    import tarfile

    import torch
    from PIL import Image

    from tests.helpers import write_webdataset

    folder = tiny_models.save_pipeline(tmp_path / "sd2", "sd2", seed=1)
    write_webdataset(tmp_path / "wds", 2, 5)  # shard 0 holds two bad samples, shard 1 is truncated
    common = ["--config", "sd2_base:tiny", f"--config.pretrained={folder}", "--config.data.name=webdataset",
              f"--config.data.files={tmp_path}/wds/{{00000..00001}}.tar"]
    logs = _train_on_two_processes(["encode", "--out", tmp_path / "latents"] + common, tmp_path)
    for host, log in enumerate(logs):  # host i of 2 takes shards i::2
        assert f"encode: 1/1 shards of host {host}: {tmp_path}/latents/0000{host}.tar" in log, log[-2000:]
    assert "skipped 00000.tar:0000099990: undecodable image" in logs[0]

    _, vae, _ = tiny_models.build_torch_models("sd2", seed=1)
    for shard in ("00000.tar", "00001.tar"):
        with tarfile.open(tmp_path / "wds" / shard) as tar:  # the truncated shard: read up to the cut
            images = {}
            try:
                for m in tar:
                    if m.name.endswith((".png", ".jpg")) and not m.name.startswith("00000999"):
                        images[m.name.split(".")[0]] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
            except tarfile.ReadError:
                pass
        with tarfile.open(tmp_path / "latents" / shard) as tar:
            got = {m.name.split(".")[0]: np.load(io.BytesIO(tar.extractfile(m).read()))
                   for m in tar if m.name.endswith(".npy")}
        assert got and set(got) <= set(images)
        for key, moments in got.items():
            img = images[key]
            h, w = img.shape[:2]  # the shorter side is 32 already: a centre crop, no resize
            crop = img[(h - 32) // 2:(h - 32) // 2 + 32, (w - 32) // 2:(w - 32) // 2 + 32]
            x = torch.from_numpy(crop.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
            with torch.no_grad():
                dist = vae.encode(x).latent_dist
            want = torch.cat([dist.mean, dist.logvar], dim=1)[0].numpy()
            np.testing.assert_allclose(moments, want, rtol=1e-4, atol=1e-4, err_msg=key)
    again = _train(["encode", "--out", tmp_path / "latents"] + common, tmp_path)
    assert again.count("exists, skipped") == 2

    out = _train(["latent", "--workdir", tmp_path / "w", "--config", "sd2_base:tiny", f"--config.pretrained={folder}",
                  "--config.data.name=webdataset", "--config.data.moments_ext=npy", "--config.data.shuffle_buffer=4",
                  f"--config.data.files={tmp_path}/latents/{{00000..00001}}.tar"], tmp_path)
    assert "step 4/4" in out and "cached latents" not in out
