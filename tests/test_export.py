"""Exports the PyTorch world reads: diffusers folders and original single files, checked with diffusers itself.

Reference: tiny random diffusers pipelines (tests/tiny_models.py) loaded into sdjax and written
back out; diffusers loads the result and samples the same images from the same start latents,
and its own single-file converters map the single file back to the original tensors.
"""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from sdjax import generate
from sdjax.checkpoints import export, load as load_lib, single_file
from sdjax.stable_diffusion import StableDiffusion
from tests import tiny_models
from tests.single_file_fixtures import with_text_model_prefix
from tests.helpers import nchw

PROMPTS = ["a photo of a cat", "a dog", ""]
SIZE, STEPS, SCALE = 16, 10, 7.5
WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
           "text_encoder": "text_encoder/model.safetensors"}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def source(request, tmp_path_factory):
    style = request.param
    folder = tiny_models.save_pipeline(tmp_path_factory.mktemp(style) / "pipe", style, seed=4)
    return style, folder, StableDiffusion.from_pretrained(folder)


def _states(folder) -> dict[str, dict[str, np.ndarray]]:
    states = {name: load_file(os.path.join(folder, f)) for name, f in WEIGHTS.items()}
    states["text_encoder"] = with_text_model_prefix(states["text_encoder"])
    return states


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, f"{what} {k}"
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what} {k}")


def test_diffusers_export_is_bit_exact_and_diffusers_samples_the_same_images(source, tmp_path):
    from diffusers import StableDiffusionPipeline

    style, folder, sd = source
    out = tmp_path / "exported"
    sd.save_pretrained(out, format="diffusers")
    original, exported = _states(folder), _states(out)
    for name in WEIGHTS:  # diffusers -> sdjax -> diffusers gives back every tensor bit for bit
        _assert_same(exported[name], original[name], name)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae"):  # diffusers builds the same networks from the exported configs
        want = getattr(StableDiffusionPipeline.from_pretrained(folder), name).config
        got = getattr(pipe, name).config
        assert {k: got[k] for k in want if not k.startswith("_")} == {k: v for k, v in want.items()
                                                                      if not k.startswith("_")}, name
    assert pipe.scheduler.config.prediction_type == tiny_models.STYLES[style]["prediction_type"]
    f = sd.downsample_factor
    noise = generate.starting_noise(3, len(PROMPTS), (SIZE // f, SIZE // f, 4))
    ours = sd.txt2img(PROMPTS, steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE, init_latents=noise,
                      output="float")
    ref = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE,
               latents=nchw(noise), output_type="np").images
    assert np.abs(ours - ref).mean() <= 3e-4
    assert ref.std() > 0.01  # the images are not flat, so agreement means something


def test_single_file_export_reads_back_through_diffusers_converters_and_sdjax(source, tmp_path):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file as load_torch

    style, folder, sd = source
    path = tmp_path / "model.safetensors"
    sd.save_pretrained(path, format="single_file")
    ckpt = load_torch(str(path))
    original = _states(folder)
    to_np = lambda d: {k: v.numpy() for k, v in d.items()}  # noqa: E731
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    _assert_same(to_np(convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config))), original["unet"], "unet")
    _assert_same(to_np(convert_ldm_vae_checkpoint(ckpt, dict(pipe.vae.config))), original["vae"], "vae")
    if style == "sd1":
        text = to_np(convert_ldm_clip_checkpoint(ckpt))
        np.testing.assert_array_equal(text.pop("text_model.embeddings.position_ids"), np.arange(77)[None])
    else:  # diffusers keeps every resblock but SD 2's 24th; sdjax writes the unused last one as an identity
        text = to_np(convert_open_clip_checkpoint(pipe.text_encoder, ckpt))
        layers = pipe.text_encoder.config.num_hidden_layers
        extra = {k for k in text if k.startswith(f"text_model.encoder.layers.{layers}.")}
        assert extra and all(not text[k].any() for k in extra if "layer_norm" not in k)
        text = {k: v for k, v in text.items() if k not in extra}
    _assert_same(text, original["text_encoder"], "text_encoder")

    options = dict(tiny_models.STYLES[style]["single_file"]["options"], image_size=sd.native_size)  # not in the file
    back = StableDiffusion.from_pretrained(path, tokenizer=str(folder / "tokenizer"), single_file_options=options,
                                           prediction_type=sd.configs.scheduler.prediction_type)
    # upcast_attention is not in a single file either (sdjax's attention softmax is always f32)
    assert back.configs.unet == dataclasses.replace(sd.configs.unet, upcast_attention=False)
    # not in a single file; unused by SD
    unknowable = ("projection_dim", "bos_token_id", "eos_token_id", "pad_token_id")
    assert ({k: v for k, v in vars(back.configs.text_encoder).items() if k not in unknowable}
            == {k: v for k, v in vars(sd.configs.text_encoder).items() if k not in unknowable})
    for a, b in zip(jax_leaves(sd.params), jax_leaves(back.params)):
        np.testing.assert_array_equal(a, b)
    back_path = tmp_path / "again.safetensors"  # single file -> sdjax -> single file: the same tensors
    back.save_pretrained(back_path, format="single_file")
    _assert_same(load_file(str(back_path)), load_file(str(path)), "single file round trip")


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("source", ["sd1"], indirect=True)
def test_half_precision_exports_cast_every_tensor(source, tmp_path):
    style, folder, sd = source
    sd.save_pretrained(tmp_path / "f16", format="diffusers", dtype=jnp.float16)
    exported, original = _states(tmp_path / "f16"), _states(folder)
    for name in WEIGHTS:
        for k, v in original[name].items():
            assert exported[name][k].dtype == np.float16
            np.testing.assert_array_equal(exported[name][k], v.astype(np.float16))
    sd.save_pretrained(tmp_path / "bf16.safetensors", format="single_file", dtype=jnp.bfloat16)
    unet = {k: v for k, v in load_file(str(tmp_path / "bf16.safetensors")).items()
            if k.startswith(single_file.UNET_PREFIX)}
    assert {v.dtype.name for v in unet.values()} == {"bfloat16"}
    sd.save_pretrained(tmp_path / "sdjax-bf16", dtype=jnp.bfloat16)
    back = StableDiffusion.from_pretrained(tmp_path / "sdjax-bf16")
    np.testing.assert_array_equal(
        np.asarray(back.params["unet"]["conv_in"]["kernel"]),
        np.asarray(sd.params["unet"]["conv_in"]["kernel"]).astype(jnp.bfloat16).astype(np.float32))


@pytest.mark.parametrize("source", ["sd2"], indirect=True)
def test_autoencoder_exports_a_diffusers_folder(source, tmp_path):
    from diffusers import AutoencoderKL

    style, folder, sd = source
    out = tmp_path / "vae"
    export.save_vae(out, sd.configs.vae, sd.params["vae"], format="diffusers")
    _assert_same(load_file(str(out / "diffusion_pytorch_model.safetensors")), _states(folder)["vae"], "vae")
    assert AutoencoderKL.from_pretrained(out).config.block_out_channels == list(sd.configs.vae.block_out_channels)
    config, params = load_lib.load_vae(str(out))  # what the latent trainer's autoencoder.path reads
    assert config == sd.configs.vae
    for a, b in zip(jax_leaves(sd.params["vae"]), jax_leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("source", ["sd1"], indirect=True)
def test_bad_exports_are_refused_and_write_nothing(source, tmp_path):
    style, folder, sd = source
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        sd.save_pretrained(tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        sd.save_pretrained(tmp_path / "model.ckpt", format="single_file")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a diffusers folder"):
        sd.save_pretrained(occupied, format="diffusers")
    assert os.listdir(occupied) == ["notes.txt"] and not (tmp_path / "occupied.partial").exists()
    bare = StableDiffusion(sd.configs, sd.params)  # no tokenizer
    with pytest.raises(ValueError, match="tokenizer"):
        bare.save_pretrained(tmp_path / "bare", format="diffusers")
    assert not (tmp_path / "bare").exists()

