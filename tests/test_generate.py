"""Text2Img / Img2Img against diffusers' PyTorch pipelines on a tiny saved checkpoint."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from sdjax import generate
from sdjax.stable_diffusion import StableDiffusion
from tests import tiny_models
from tests.helpers import nchw

PROMPTS = ["a photo of a cat", "a dog", ""]
SIZE, STEPS, SCALE = 16, 10, 7.5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_models.save_pipeline(tmp_path_factory.mktemp("sd1") / "pipe", "sd1", seed=3)


@pytest.fixture(scope="module")
def sd(folder):
    return StableDiffusion.from_pretrained(folder)


def _latent_shape(sd):
    f = sd.downsample_factor
    return (SIZE // f, SIZE // f, sd.configs.unet.in_channels)


def test_txt2img_matches_diffusers(folder, sd):
    from diffusers import StableDiffusionPipeline

    noise = generate.starting_noise(11, len(PROMPTS), _latent_shape(sd))
    ours = sd.txt2img(PROMPTS, steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE,
                      init_latents=noise, output="float")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE,
               latents=nchw(noise), output_type="np").images
    assert ours.shape == ref.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert np.abs(ours - ref).mean() <= 1e-3
    assert ref.std() > 0.01  # the images are not flat, so agreement means something


def test_img2img_matches_diffusers(folder, sd, monkeypatch):
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
    from diffusers import StableDiffusionImg2ImgPipeline

    n, shape, seed, strength = 2, _latent_shape(sd), 5, 0.6
    init = np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    noise = generate.starting_noise(21, n, shape)
    ours = sd.img2img(init, PROMPTS[:n], strength=strength, steps=STEPS, guidance_scale=SCALE, seed=seed,
                      init_latents=noise, output="float")
    # diffusers draws the posterior sample and the start noise with torch; hand it ours.
    posterior = generate.starting_noise(seed, n, shape, generate.POSTERIOR_STREAM)
    monkeypatch.setattr(vae_module, "randn_tensor", lambda *a, **k: nchw(posterior))
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda *a, **k: nchw(noise))
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref = pipe(PROMPTS[:n], image=init.astype(np.float32) / 255.0, strength=strength, num_inference_steps=STEPS,
               guidance_scale=SCALE, output_type="np").images
    assert np.abs(ours - ref).mean() <= 1e-3
    assert np.abs(ref - init / 255.0).mean() > 0.01  # it did change the image


def test_seed_reproducible_and_sharding_invariant(folder, sd):
    kw = dict(steps=3, height=SIZE, width=SIZE, sampler="euler_a", seed=7, output="float")
    a = sd.txt2img(PROMPTS, **kw)
    b = sd.txt2img(PROMPTS, **kw)
    np.testing.assert_array_equal(a, b)
    c = sd.txt2img(PROMPTS, **dict(kw, seed=8))
    assert np.abs(a - c).mean() > 1e-3
    assert len(jax.devices()) == 8
    one = generate.Generator(sd.generator.nets, sd.configs.scheduler,
                             mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    noise = generate.starting_noise(7, len(PROMPTS), _latent_shape(sd))
    inputs = generate.Inputs(sd.tokenize(PROMPTS), sd.tokenize([""] * 3), noise)
    single = one(sd.params, inputs, sampler="euler_a", steps=3, eta=0.0, guidance_scale=7.5, seed=7,
                 scaling_factor=sd.scaling_factor)
    np.testing.assert_allclose(single, a, atol=1e-5)


def test_guidance_scale_rescale_and_eta_do_not_recompile(sd):
    kw = dict(steps=2, height=SIZE, width=SIZE, sampler="ddim", output="float")
    a = sd.txt2img(["a cat"], guidance_scale=1.0, **kw)
    keys = set(sd.generator._compiled)
    compiled = sd.generator._compiled[("ddim", generate.Span(), (False, False, False))]
    before = compiled._cache_size()
    b = sd.txt2img(["a cat"], guidance_scale=9.0, eta=0.5, **kw)
    c = sd.txt2img(["a cat"], guidance_scale=9.0, eta=0.5, guidance_rescale=0.7, **kw)
    assert np.abs(a - b).mean() > 1e-4 and np.abs(b - c).mean() > 1e-4
    assert compiled._cache_size() == before and set(sd.generator._compiled) == keys


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=20), "multiple of 8"),
    (dict(width=0), "multiple of 8"),
    (dict(sampler="plms"), "valid names"),
    (dict(steps=0), "steps"),
    (dict(negative_prompts=["a", "b"]), "negative prompts"),
    (dict(init_latents=np.zeros((1, 2, 2, 4))), "init_latents"),
])
def test_bad_txt2img_input_fails_before_compiling(folder, kwargs, match):
    sd = StableDiffusion.from_pretrained(folder)
    with pytest.raises(ValueError, match=match):
        sd.txt2img(["a cat"], **{**dict(steps=2, height=SIZE, width=SIZE), **kwargs})
    assert not sd.generator._compiled


@pytest.mark.parametrize("strength", [0.0, 1.5])
def test_bad_strength(sd, strength):
    with pytest.raises(ValueError, match="strength"):
        sd.img2img(np.zeros((SIZE, SIZE, 3), np.uint8), ["a cat"], strength=strength, steps=2)


def test_one_image_convention_in_and_out_and_native_size(sd):
    from PIL import Image

    init = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    kw = dict(strength=0.5, steps=2, seed=1)
    as_uint8 = sd.img2img(init, ["a cat"], output="float", **kw)
    as_float = sd.img2img(init.astype(np.float32) / 255.0, ["a cat"], output="float", **kw)
    as_pil = sd.img2img(Image.fromarray(init), ["a cat"], output="float", **kw)
    np.testing.assert_array_equal(as_float, as_uint8)
    np.testing.assert_array_equal(as_pil, as_uint8)
    assert as_uint8.shape == (1, SIZE, SIZE, 3)  # the init image's own size
    np.testing.assert_array_equal(sd.img2img(init, ["a cat"], **kw), np.round(as_uint8 * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        sd.img2img(init.astype(np.float32) / 127.5 - 1.0, ["a cat"], **kw)
    native = sd.configs.unet.sample_size * sd.downsample_factor
    assert sd.native_size == native == 32
    assert sd.txt2img(["a cat"], steps=1).shape == (1, native, native, 3)


def test_diffusers_argument_names_mean_the_same(sd):
    """num_inference_steps, latents and negative_prompt (diffusers' names) are steps, init_latents and
    negative_prompts; giving a name twice, or one that is neither, is an error naming it."""
    kw = dict(height=SIZE, width=SIZE, sampler="ddim", guidance_scale=5.0, output="float")
    noise = np.asarray(jax.random.normal(jax.random.key(3), (1,) + _latent_shape(sd)))
    ours = sd.txt2img(["a cat"], negative_prompts=["a dog"], steps=2, init_latents=noise, **kw)
    theirs = sd.txt2img("a cat", negative_prompt="a dog", num_inference_steps=2, latents=noise, **kw)
    np.testing.assert_array_equal(ours, theirs)
    assert np.abs(ours - sd.txt2img(["a cat"], steps=2, init_latents=noise, **kw)).mean() > 1e-4  # the negative counts
    with pytest.raises(TypeError, match="'num_inference_steps' and 'steps' are the same option"):
        sd.txt2img(["a cat"], steps=2, num_inference_steps=2, **kw)
    with pytest.raises(TypeError, match="unknown option 'num_steps'"):
        sd.txt2img(["a cat"], num_steps=2)
