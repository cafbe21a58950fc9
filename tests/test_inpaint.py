"""Inpainting against diffusers' StableDiffusionInpaintPipeline on tiny saved checkpoints: a 9-channel
inpainting UNet, and a plain 4-channel UNet (known region blended back after every step)."""

import numpy as np
import pytest
import torch

from sdjax import generate, options
from sdjax.stable_diffusion import StableDiffusion
from tests import tiny_models
from tests.helpers import nchw

PROMPTS = ["a photo of a cat", "a dog"]
SIZE, STEPS, SCALE = 16, 10, 7.5


@pytest.fixture(scope="module")
def folder9(tmp_path_factory):
    return tiny_models.save_pipeline(tmp_path_factory.mktemp("inpaint") / "pipe", "sd1", seed=5, inpainting=True)


@pytest.fixture(scope="module")
def folder4(tmp_path_factory):
    return tiny_models.save_pipeline(tmp_path_factory.mktemp("plain") / "pipe", "sd1", seed=6)


@pytest.fixture(scope="module")
def sd9(folder9):
    return StableDiffusion.from_pretrained(folder9)  # shared: tests of one shape reuse its compiled sampler


@pytest.fixture(scope="module")
def sd4(folder4):
    return StableDiffusion.from_pretrained(folder4)


def _inputs(sd):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(PROMPTS), SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((len(PROMPTS), SIZE, SIZE), np.float32)
    masks[0, 4:12, 2:10] = 1.0
    masks[1, :, 8:] = 0.7  # binarised to 1
    shape = (SIZE // sd.downsample_factor, SIZE // sd.downsample_factor, 4)
    return images, masks, shape


def _diffusers(folder, monkeypatch, images, masks, *, sampler, posterior_draws, noise, strength=1.0):
    """diffusers' inpainting with our random draws: the VAE posterior samples in the order diffusers
    takes them, and the start noise (handed as latents at strength 1, drawn otherwise)."""
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline

    draws = iter(posterior_draws)
    monkeypatch.setattr(vae_module, "randn_tensor", lambda *a, **k: nchw(next(draws)))
    monkeypatch.setattr(inpaint_module, "randn_tensor", lambda *a, **k: nchw(noise))
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if sampler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe(PROMPTS, image=images.astype(np.float32) / 255.0, mask_image=torch.from_numpy(masks[:, None]),
                strength=strength, num_inference_steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE,
                latents=nchw(noise) if strength == 1.0 else None, output_type="np").images


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_inpainting_unet_matches_diffusers(folder9, sd9, sampler, monkeypatch):
    sd = sd9
    assert sd.is_inpainting_model and sd.configs.unet.in_channels == 9
    images, masks, shape = _inputs(sd)
    seed = 3
    noise = generate.starting_noise(seed, len(PROMPTS), shape)
    ours = sd.inpaint(images, masks, PROMPTS, steps=STEPS, guidance_scale=SCALE, sampler=sampler, seed=seed,
                      init_latents=noise, output="float")
    masked_draw = generate.starting_noise(seed, len(PROMPTS), shape, generate.MASKED_POSTERIOR_STREAM)
    ref = _diffusers(folder9, monkeypatch, images, masks, sampler=sampler, posterior_draws=[masked_draw], noise=noise)
    assert ours.shape == ref.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert np.abs(ours - ref).mean() <= 3e-4
    assert ref.std() > 0.01


def test_inpainting_unet_with_strength_below_one(folder9, sd9, monkeypatch):
    sd = sd9
    images, masks, shape = _inputs(sd)
    seed, strength = 4, 0.6
    noise = generate.starting_noise(seed, len(PROMPTS), shape)
    ours = sd.inpaint(images, masks, PROMPTS, strength=strength, steps=STEPS, guidance_scale=SCALE, seed=seed,
                      init_latents=noise, output="float")
    draws = [generate.starting_noise(seed, len(PROMPTS), shape, stream)
             for stream in (generate.POSTERIOR_STREAM, generate.MASKED_POSTERIOR_STREAM)]
    ref = _diffusers(folder9, monkeypatch, images, masks, sampler="ddim", posterior_draws=draws, noise=noise,
                     strength=strength)
    assert np.abs(ours - ref).mean() <= 3e-4


def test_plain_unet_blends_the_known_region_as_diffusers(folder4, sd4, monkeypatch):
    sd, sampler = sd4, "ddim"
    assert not sd.is_inpainting_model
    images, masks, shape = _inputs(sd)
    seed = 5
    noise = generate.starting_noise(seed, len(PROMPTS), shape)
    ours = sd.inpaint(images, masks, PROMPTS, steps=STEPS, guidance_scale=SCALE, sampler=sampler, seed=seed,
                      init_latents=noise, output="float")
    # diffusers encodes the image (used) and then the masked image (unused by a 4-channel UNet)
    image_draw = generate.starting_noise(seed, len(PROMPTS), shape, generate.POSTERIOR_STREAM)
    ref = _diffusers(folder4, monkeypatch, images, masks, sampler=sampler, posterior_draws=[image_draw, noise],
                     noise=noise)
    assert np.abs(ours - ref).mean() <= 3e-4
    txt = sd.txt2img(PROMPTS, steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE, init_latents=noise,
                     output="float")
    assert np.abs(ours - txt).mean() > 0.01  # the known region pulled the result away from plain txt2img


def test_bad_inpainting_input_fails_before_compiling(folder9):
    sd = StableDiffusion.from_pretrained(folder9)  # its own: nothing may have compiled
    images, masks, _ = _inputs(sd)
    with pytest.raises(ValueError, match=r"masks are 8x8 but the images are 16x16"):
        sd.inpaint(images, masks[:, :8, :8], PROMPTS, steps=2)
    with pytest.raises(ValueError, match=r"float masks must be in \[0, 1\]"):
        sd.inpaint(images, masks * 2.0, PROMPTS, steps=2)
    with pytest.raises(ValueError, match="3 masks for 2 prompts"):
        sd.inpaint(images, np.concatenate([masks, masks[:1]]), PROMPTS, steps=2)
    with pytest.raises(ValueError, match="inpainting model.*inpaint"):
        sd.txt2img(PROMPTS, steps=2, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="inpainting model.*inpaint"):
        sd.img2img(images, PROMPTS, steps=2)
    assert not sd.generator._compiled  # every error came before any compilation


def test_masks_as_pil_and_uint8_binarise_at_half(folder9):
    from PIL import Image

    m = np.zeros((SIZE, SIZE), np.uint8)
    m[:, :5] = 127  # just below 0.5: kept
    m[:, 5:] = 128  # just above: repainted
    model = options.Model(downsample_factor=8, latent_channels=4, unet_in_channels=9, native_size=SIZE)
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    masks = lambda m, n: options.SamplingOptions().request(model, ["x"] * n, images=image, masks=m).masks  # noqa: E731
    got = masks([Image.fromarray(m)], 2)
    assert got.shape == (2, SIZE, SIZE, 1)
    np.testing.assert_array_equal(got[0, :, :, 0], (np.arange(SIZE) >= 5)[None].repeat(SIZE, 0).astype(np.float32))
    np.testing.assert_array_equal(masks(m[None, :, :, None], 1), got[:1])


@pytest.mark.parametrize("style", ["sd1", "sd2"])  # the sd-v1-5-inpainting and 512-inpainting-ema layouts
def test_inpainting_single_files_load_and_export(style, tmp_path):
    import json

    from diffusers import StableDiffusionInpaintPipeline
    from tests.single_file_fixtures import write_original

    folder = tiny_models.save_pipeline(tmp_path / "pipe", style, seed=7, inpainting=True)
    unet, vae, text = tiny_models.build_torch_models(style, seed=7, inpainting=True)
    path = tmp_path / "inpainting.safetensors"
    sf = tiny_models.STYLES[style]["single_file"]
    write_original(str(path), unet.state_dict(), vae.state_dict(), text.state_dict(), version=sf["version"])
    from_folder = StableDiffusion.from_pretrained(folder)
    from_file = StableDiffusion.from_pretrained(
        path, tokenizer=str(folder / "tokenizer"), prediction_type=tiny_models.STYLES[style]["prediction_type"],
        single_file_options=dict(sf["options"], image_size=from_folder.native_size))
    assert from_file.is_inpainting_model and from_file.configs.unet.in_channels == 9
    for a, b in zip(*(map(np.asarray, __import__("jax").tree_util.tree_leaves(m.params))
                      for m in (from_folder, from_file))):
        np.testing.assert_array_equal(a, b)

    from_file.save_pretrained(tmp_path / "exported", format="diffusers")
    index = json.loads((tmp_path / "exported" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "exported").unet.config.in_channels == 9
    from_file.save_pretrained(tmp_path / "again.safetensors", format="single_file")
    back = StableDiffusion.from_pretrained(tmp_path / "again.safetensors", tokenizer=str(folder / "tokenizer"),
                                           single_file_options=dict(sf["options"], image_size=from_folder.native_size))
    assert back.is_inpainting_model



def test_plain_inpainting_is_sharding_invariant_with_dpm_solver(sd4):
    """Three images over 8 devices (padded) equal the same on one device, with the blend inside a
    sampler not compared with diffusers above."""
    import copy

    import jax
    from jax.sharding import Mesh

    sd, sampler = copy.copy(sd4), "dpm++2m"
    images, masks, _ = _inputs(sd)
    prompts = PROMPTS + ["a bird"]
    images, masks = np.concatenate([images, images[:1]]), np.concatenate([masks, masks[:1]])
    kw = dict(steps=4, sampler=sampler, seed=2, output="float")
    eight = sd.inpaint(images, masks, prompts, **kw)
    sd.generator = generate.Generator(sd.generator.nets, sd.configs.scheduler,
                                      mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    one = sd.inpaint(images, masks, prompts, **kw)
    np.testing.assert_allclose(eight, one, atol=1e-5)
