"""SDXL: a tiny random StableDiffusionXLPipeline built and saved by diffusers, loaded by sdjax, its
images equal to diffusers' from the same starting latents."""

import dataclasses
import re

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from sdjax import generate, options, presets
from sdjax.stable_diffusion import StableDiffusion
from tests import tiny_models


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_models.save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipeline")


def test_diffusers_folder_loads_as_sdxl(folder):
    sd = StableDiffusion.from_pretrained(folder)
    c = sd.configs
    assert c.is_sdxl and c.force_zeros_for_empty_prompt and c.vae.scaling_factor == 0.13025
    assert c.text_encoder.output_layer == c.text_encoder_2.output_layer == "penultimate_hidden"
    assert c.text_encoder_2.with_projection and not c.text_encoder.with_projection
    assert c.scheduler.timestep_spacing == "leading" and sd.native_size == 32
    assert sd.tokenize(["a"], encoder=2)[0, 3] == sd.tokenizer_2.convert_tokens_to_ids("!")  # pads with "!"
    assert sd.tokenize(["a"])[0, 3] == sd.tokenizer.eos_token_id
    # One UNet call takes SDXL's added conditioning, and says so when it is missing.
    from sdjax.models.unet import AddedCond

    x, ctx = np.zeros((1, 16, 16, 4), np.float32), sd.encode_prompt(["a cat"])
    assert ctx.shape == (1, 77, 32 + 24)
    added = AddedCond(np.zeros((1, 16), np.float32), np.asarray([[32, 32, 0, 0, 32, 32]], np.float32))
    assert sd.unet_apply(x, 500, ctx, added).shape == x.shape
    with pytest.raises(ValueError, match="needs `added`"):
        sd.unet_apply(x, 500, ctx)


def test_sdjax_and_diffusers_exports_round_trip_bit_for_bit(folder, tmp_path):
    """The sdjax export loads back equal (configs, every parameter, both tokenizers); the diffusers
    export holds the original folder's tensors bit for bit and is an SDXL pipeline to diffusers."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.numpy import load_file

    sd = StableDiffusion.from_pretrained(folder)
    sd.save_pretrained(tmp_path / "sdjax")
    back = StableDiffusion.from_pretrained(tmp_path / "sdjax")
    assert back.configs == sd.configs
    a, b = traverse_util.flatten_dict(sd.params, sep="/"), traverse_util.flatten_dict(back.params, sep="/")
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2/") for k in a)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    for encoder in (1, 2):
        np.testing.assert_array_equal(back.tokenize(["a cat"], encoder), sd.tokenize(["a cat"], encoder))

    sd.save_pretrained(tmp_path / "diffusers", format="diffusers")
    for component, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                            ("text_encoder", "model"), ("text_encoder_2", "model")):
        # transformers 5.6+ writes CLIPTextModel without its text_model. level; sdjax writes it (every version reads it)
        want, got = ({k.removeprefix("text_model."): v
                      for k, v in load_file(str(f / component / f"{file}.safetensors")).items()
                      if not k.endswith("position_ids")} for f in (folder, tmp_path / "diffusers"))
        assert got.keys() == want.keys(), component
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{component} {k}")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "diffusers")
    assert pipe.config.force_zeros_for_empty_prompt and pipe.tokenizer_2.pad_token == "!"


def test_fp16_variant_folder_loads_with_variant_and_says_so_without(folder, tmp_path):
    """diffusers' ``save_pretrained(variant="fp16")`` of the half-precision pipeline (the files the hub's
    SDXL repositories carry as *.fp16.safetensors): read with variant="fp16" (API and --variant), every
    parameter equals the float32 folder's rounded to float16; without it, the error names the variant."""
    from diffusers import StableDiffusionXLPipeline

    from sdjax.checkpoints.errors import CheckpointError
    from sdjax.cli import convert

    StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float16).save_pretrained(
        tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "text_encoder_2" / "model.fp16.safetensors").is_file()
    half = StableDiffusion.from_pretrained(tmp_path / "fp16", variant="fp16")
    full = StableDiffusion.from_pretrained(folder)
    assert half.configs == full.configs
    a, b = traverse_util.flatten_dict(half.params, sep="/"), traverse_util.flatten_dict(full.params, sep="/")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == np.float32, k
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]).astype(np.float16).astype(np.float32),
                                      err_msg=k)
    with pytest.raises(CheckpointError, match=r"holds the 'fp16' variant: pass variant='fp16' \(--variant fp16"):
        StableDiffusion.from_pretrained(tmp_path / "fp16")
    convert.main([str(tmp_path / "fp16"), str(tmp_path / "out"), "--to", "sdjax", "--variant", "fp16"])
    back = traverse_util.flatten_dict(StableDiffusion.from_pretrained(tmp_path / "out").params, sep="/")
    for k in a:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(a[k]), err_msg=k)


@pytest.mark.parametrize("case", ["euler", "ddim_negative_prompt_and_micro", "negative_micro_clip_skip_rescale"])
def test_txt2img_equals_diffusers(folder, case):
    """Euler with no negative prompt (a zero negative conditioning); DDIM with negative prompts and other
    micro-conditioning numbers; other negative micro-conditioning with clip_skip and guidance_rescale:
    against StableDiffusionXLPipeline from the same latents. The last with one prompt: diffusers repeats
    the [negative, positive] pair of time ids per image, which pairs them with the wrong rows when
    several images have a negative micro-conditioning of their own; sdjax gives every image's negative
    row the negative numbers."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    sd = StableDiffusion.from_pretrained(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    prompts = ["a red circle on a blue background", "a green triangle"]
    kw = dict(num_inference_steps=6, guidance_scale=5.0, height=32, width=32)
    sampler = "euler"
    if case != "euler":
        # SDXL base's scheduler_config.json says so (the tiny Euler config leaves them to DDIM's defaults).
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
        sampler = "ddim"
    if case == "ddim_negative_prompt_and_micro":
        kw.update(negative_prompt=["blurry", "a square"], original_size=(64, 48), crops_coords_top_left=(8, 4),
                  target_size=(32, 40))
    if case == "negative_micro_clip_skip_rescale":
        prompts = prompts[:1]
        kw.update(negative_original_size=(16, 16), negative_crops_coords_top_left=(4, 4), negative_target_size=(32, 24),
                  clip_skip=1, guidance_rescale=0.7, negative_prompt="dark")
    noise = generate.starting_noise(3, len(prompts), (16, 16, 4))
    ours = sd.txt2img(prompts, sampler=sampler, init_latents=noise, output="float", **kw)
    ref = pipe(prompts, latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))),
               output_type="np", **kw).images
    assert ours.shape == ref.shape == (len(prompts), 32, 32, 3)
    assert np.abs(ours - ref).mean() <= 3e-4, np.abs(ours - ref).mean()
    assert ref.std() > 0.02  # the images are not flat


def test_micro_conditioning_changes_the_image_and_is_refused_by_sd1(folder):
    sd = StableDiffusion.from_pretrained(folder)
    noise = generate.starting_noise(0, 1, (16, 16, 4))
    a = sd.txt2img("a cat", steps=2, init_latents=noise, output="float")
    b = sd.txt2img("a cat", steps=2, init_latents=noise, output="float", original_size=(256, 256))
    assert np.abs(a - b).max() > 1e-3
    with pytest.raises(ValueError, match="must be two numbers"):
        sd.txt2img("a cat", steps=2, original_size=(256,))
    sd1 = options.Model(downsample_factor=8, latent_channels=4, unet_in_channels=4, native_size=512)
    with pytest.raises(ValueError, match="original_size, aesthetic_score: only SDXL models"):
        options.SamplingOptions(original_size=(256, 256), aesthetic_score=5.0).request(sd1, "a cat")


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return tiny_models.save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "refiner", seed=1, refiner=True)


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_img2img_equals_diffusers(folder, refiner, model, monkeypatch):
    """Img2Img through StableDiffusionXLImg2ImgPipeline: the base with a negative prompt, and the refiner
    (its second text encoder alone, an aesthetic score in place of the target size) with other scores."""
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module
    from diffusers import StableDiffusionXLImg2ImgPipeline

    path = folder if model == "base" else refiner
    sd = StableDiffusion.from_pretrained(path)
    assert (sd.configs.text_encoder is None) == (model == "refiner") == sd.configs.requires_aesthetics_score
    n, shape, seed, strength = 2, (16, 16, 4), 5, 0.6
    init = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    noise = generate.starting_noise(21, n, shape)
    kw = dict(num_inference_steps=5, guidance_scale=4.0, negative_prompt=["blurry", "dark"])
    if model == "refiner":
        kw.update(aesthetic_score=7.0, negative_aesthetic_score=2.0, original_size=(64, 64))
    ours = sd.img2img(init, ["a red circle", "a cat"], strength=strength, sampler="euler", seed=seed,
                      init_latents=noise, output="float", **kw)
    # diffusers draws the posterior sample and the start noise with torch; hand it ours.
    posterior = generate.starting_noise(seed, n, shape, generate.POSTERIOR_STREAM)
    as_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    monkeypatch.setattr(vae_module, "randn_tensor", lambda *a, **k: as_torch(posterior))
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda *a, **k: as_torch(noise))
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(path)
    ref = pipe(["a red circle", "a cat"], image=init.astype(np.float32) / 255.0, strength=strength,
               output_type="np", **kw).images
    assert np.abs(ours - ref).mean() <= 3e-4, np.abs(ours - ref).mean()
    assert np.abs(ref - init / 255.0).mean() > 0.01  # it did change the image
    if model == "refiner":
        with pytest.raises(ValueError, match="no tokenizer for text encoder 1"):
            sd.tokenize(["a cat"])


def test_base_then_refiner_equals_diffusers_ensemble_of_experts(folder, refiner):
    """diffusers' ensemble of experts: the base stops at denoising_end and returns latents, the refiner
    continues them from denoising_start. sdjax's one call (refiner=, high_noise_frac=) and its two calls
    equal StableDiffusionXLPipeline then StableDiffusionXLImg2ImgPipeline from the same start latents: 10
    leading Euler steps cut at 0.7 (timesteps 901..301 on the base, 201, 101, 1 on the refiner)."""
    base, ref = StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(refiner)
    prompts, n = ["a red circle on a blue background", "a green triangle"], 2
    noise = generate.starting_noise(8, n, (16, 16, 4))
    kw = dict(num_inference_steps=10, guidance_scale=5.0, negative_prompt=["blurry", "dark"])
    ours = base.txt2img(prompts, refiner=ref, high_noise_frac=0.7, sampler="euler", init_latents=noise,
                        output="float", **kw)
    handoff, ref_images = _diffusers_ensemble(folder, refiner, prompts, noise, kw, sampler="euler")
    assert ours.shape == ref_images.shape == (n, 32, 32, 3)
    assert np.abs(ours - ref_images).mean() <= 3e-4, np.abs(ours - ref_images).mean()

    # The two calls: the base's latents (left on the device) are diffusers' handoff; the refiner's images ours.
    latents = base.txt2img(prompts, sampler="euler", init_latents=noise, denoising_end=0.7, output="latent", **kw)
    assert latents.shape == (n, 16, 16, 4) and not isinstance(latents, np.ndarray)
    want = handoff.numpy().transpose(0, 2, 3, 1)
    assert np.abs(np.asarray(latents) - want).mean() <= 1e-3 * np.abs(want).mean(), (
        np.abs(np.asarray(latents) - want).mean())
    again = ref.img2img(latents, prompts, sampler="euler", denoising_start=0.7, output="float", **kw)
    np.testing.assert_array_equal(again, ours)
    # The whole schedule from the base alone is another image; cuts that leave no step are refused.
    whole = base.txt2img(prompts, sampler="euler", init_latents=noise, output="float", **kw)
    assert np.abs(whole - ours).mean() > 1e-3
    with pytest.raises(ValueError, match="leave no step"):
        ref.img2img(latents, prompts, sampler="euler", denoising_start=0.9999, **kw)
    with pytest.raises(ValueError, match="denoising_start continues from latents"):
        base.txt2img(prompts, denoising_start=0.7)
    with pytest.raises(ValueError, match="must be a float in"):
        base.txt2img(prompts, denoising_end=1)


def _diffusers_ensemble(folder, refiner, prompts, noise, kw, sampler):
    """diffusers' base (to ``denoising_end``=0.7, latents out) then refiner (from ``denoising_start``=0.7),
    both with ``sampler``'s scheduler built from the base's scheduler config: (handoff latents, images)."""
    from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)

    scheduler = {"euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler}[sampler]
    base = StableDiffusionXLPipeline.from_pretrained(folder)
    base.scheduler = scheduler.from_config(base.scheduler.config)
    handoff = base(prompts, latents=torch.from_numpy(np.ascontiguousarray(np.asarray(noise).transpose(0, 3, 1, 2))),
                   denoising_end=0.7, output_type="latent", height=32, width=32, **kw).images
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    return handoff, pipe(prompts, image=handoff, denoising_start=0.7, output_type="np", **kw).images


def test_base_then_refiner_with_dpm_solver_equals_diffusers(folder, refiner):
    """The handoff with DPM-Solver++(2M), whose steps depend on the previous one: the base's last step
    before the cut stays second order and lands on the cut's noise level (not on zero); the refiner
    starts its own history (a first-order first step) and ends first order, as diffusers' schedulers do."""
    base, ref = StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(refiner)
    prompts, noise = (["a red circle on a blue background", "a green triangle"],
                      generate.starting_noise(9, 2, (16, 16, 4)))
    kw = dict(num_inference_steps=10, guidance_scale=5.0, negative_prompt=["blurry", "dark"])
    ours = base.txt2img(prompts, refiner=ref, high_noise_frac=0.7, sampler="dpm++2m", init_latents=noise,
                        output="float", **kw)
    _, want = _diffusers_ensemble(folder, refiner, prompts, noise, kw, sampler="dpm++2m")
    assert np.abs(ours - want).mean() <= 3e-4, np.abs(ours - want).mean()
    euler = base.txt2img(prompts, refiner=ref, high_noise_frac=0.7, sampler="euler", init_latents=noise,
                         output="float", **kw)
    assert np.abs(euler - ours).mean() > 1e-3  # the sampler reached both models


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    return tiny_models.save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "inpainting", seed=2, inpainting=True)


@pytest.mark.parametrize("model", ["inpainting", "base"])
def test_inpaint_equals_diffusers(folder, inpainting, model, monkeypatch):
    """StableDiffusionXLInpaintPipeline: a 9-channel SDXL inpainting UNet (mask and masked-image latents
    beside the noisy latents), and the base's 4-channel UNet with the known region blended back after
    every step; negative prompts and other micro-conditioning, Euler, from the same draws."""
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as inpaint_module
    from diffusers import StableDiffusionXLInpaintPipeline

    path = inpainting if model == "inpainting" else folder
    sd = StableDiffusion.from_pretrained(path)
    assert sd.is_inpainting_model == (model == "inpainting")
    n, shape, seed = 2, (16, 16, 4), 6
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((n, 32, 32), np.float32)
    masks[0, 8:24, 4:20], masks[1, :, 16:] = 1.0, 1.0
    noise = generate.starting_noise(seed, n, shape)
    prompts = ["a red circle", "a cat"]
    kw = dict(num_inference_steps=6, guidance_scale=5.0, negative_prompt=["blurry", "dark"], original_size=(64, 64),
              crops_coords_top_left=(4, 0))
    ours = sd.inpaint(images, masks, prompts, strength=1.0, sampler="euler", seed=seed, init_latents=noise,
                      output="float", **kw)
    # diffusers encodes the image (the 4-channel UNet's known region), then the masked image.
    streams = [generate.MASKED_POSTERIOR_STREAM] if model == "inpainting" else [generate.POSTERIOR_STREAM] * 2
    draws = iter([generate.starting_noise(seed, n, shape, stream) for stream in streams])
    as_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
    monkeypatch.setattr(vae_module, "randn_tensor", lambda *a, **k: as_torch(next(draws)))
    monkeypatch.setattr(inpaint_module, "randn_tensor", lambda *a, **k: as_torch(noise))
    ref = StableDiffusionXLInpaintPipeline.from_pretrained(path)(
        prompts, image=images.astype(np.float32) / 255.0, mask_image=torch.from_numpy(masks[:, None]), strength=1.0,
        height=32, width=32, latents=as_torch(noise), output_type="np", **kw).images
    assert ours.shape == ref.shape == (n, 32, 32, 3)
    assert np.abs(ours - ref).mean() <= 3e-4, np.abs(ours - ref).mean()
    keep = masks[..., None] < 0.5
    assert np.abs(ref - images / 255.0)[np.broadcast_to(~keep, ref.shape)].mean() > 0.05  # the hole was repainted


def test_docs_sdxl_command_reads_sdxl_and_its_micro_conditioning(folder, tmp_path):
    """docs/sampling.md's SDXL command through the console script (shortened by flags appended after it):
    the image it writes is the Python API's for the same seed and micro-conditioning."""
    import os
    import shlex
    import subprocess
    import sys

    from PIL import Image

    from tests.helpers import readme_block, subprocess_env

    (command,) = readme_block("## SDXL", "docs/sampling.md")
    args = [str(folder) if a == "CKPT" else a for a in shlex.split(command)]
    args[0] = os.path.join(os.path.dirname(sys.executable), "sdjax-txt2img")
    args += ["--steps", "3", "--n-samples", "1", "--seed", "4", "--out", str(tmp_path / "out"), "--skip-grid"]
    done = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (png,) = (tmp_path / "out").glob("*.png")
    sd = StableDiffusion.from_pretrained(folder)
    want = sd.txt2img(["an astronaut riding a horse"], steps=3, sampler="euler", guidance_scale=5.0, seed=4,
                      original_size=(1024, 1024), crops_coords_top_left=(0, 0))
    got = np.asarray(Image.open(png))
    assert np.abs(got.astype(int) - want[0].astype(int)).max() <= 1  # uint8 rounding of two processes' floats
    assert '"original_size": [' in png.with_suffix(".json").read_text()


def test_readme_refiner_command_equals_the_one_call(folder, refiner, tmp_path):
    """The README's base + refiner command through the console script (shortened by flags appended after
    it): its image is the Python API's txt2img(refiner=, high_noise_frac=) for the same seed, and the
    sidecar records the refiner."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    from PIL import Image

    from tests.helpers import readme_block, subprocess_env

    (command,) = readme_block("## SDXL with its refiner")
    args = [{"BASE": str(folder), "REFINER": str(refiner)}.get(a, a) for a in shlex.split(command)]
    args[0] = os.path.join(os.path.dirname(sys.executable), "sdjax-txt2img")
    args += ["--steps", "5", "--n-samples", "1", "--seed", "2", "--out", str(tmp_path / "out"), "--skip-grid"]
    done = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (png,) = (tmp_path / "out").glob("*.png")
    prompt = "a majestic lion jumping from a big stone at night"
    want = StableDiffusion.from_pretrained(folder).txt2img(
        [prompt], refiner=StableDiffusion.from_pretrained(refiner), high_noise_frac=0.8, steps=5, sampler="euler",
        guidance_scale=5.0, seed=2)
    got = np.asarray(Image.open(png))
    assert np.abs(got.astype(int) - want[0].astype(int)).max() <= 1  # uint8 rounding of two processes' floats
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["refiner"] == os.path.abspath(refiner) and meta["high_noise_frac"] == 0.8


@pytest.mark.parametrize("model", ["base", "refiner", "inpainting"])
def test_single_file_export_reads_back_through_diffusers_converters_and_sdjax(folder, refiner, inpainting, model,
                                                                              tmp_path):
    """The original single-file layout (sgm's UNet with label_emb, CLIP-L at conditioner.embedders.0,
    ViT-bigG with fused in_proj and its transposed projection at embedders.1, the refiner's at 0; the
    inpainting model's 9-channel conv_in):
    diffusers' single-file converters turn sdjax's export back into the folder's tensors bit for bit,
    and sdjax reads the file as the model it came from."""
    import json

    import safetensors.torch
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from safetensors.numpy import load_file
    from transformers import CLIPTextModelWithProjection

    path = {"base": folder, "refiner": refiner, "inpainting": inpainting}[model]
    sd = StableDiffusion.from_pretrained(path)
    out = tmp_path / "model.safetensors"
    sd.save_pretrained(out, format="single_file")
    ckpt = safetensors.torch.load_file(str(out))
    big_g = "conditioner.embedders.0.model." if model == "refiner" else "conditioner.embedders.1.model."
    assert "model.diffusion_model.label_emb.0.0.weight" in ckpt and big_g + "text_projection" in ckpt
    config = lambda name: json.loads((path / name / "config.json").read_text())  # noqa: E731
    want = {name: load_file(str(path / name / f"{stem}.safetensors"))
            for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                               ("text_encoder_2", "model"), ("text_encoder", "model")) if (path / name).is_dir()}
    got = {"unet": convert_ldm_unet_checkpoint(ckpt, config("unet")),
           "vae": convert_ldm_vae_checkpoint(ckpt, config("vae")),
           "text_encoder_2": convert_open_clip_checkpoint(
               CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2"), ckpt, prefix=big_g)}
    if model != "refiner":
        got["text_encoder"] = convert_ldm_clip_checkpoint(ckpt, "conditioner.embedders.0.transformer.")
    for name in want:
        # transformers 5.6+ writes CLIPTextModel without its text_model. level: compare the names below it
        w = {k.removeprefix("text_model."): v for k, v in want[name].items() if not k.endswith("position_ids")}
        g = {k.removeprefix("text_model."): v.numpy() for k, v in got[name].items() if not k.endswith("position_ids")}
        assert g.keys() == w.keys(), name
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=f"{name} {k}")

    options = dict(image_size=32, norm_num_groups=8, unet_heads=(2, 4, 8), text_heads=4)
    single = StableDiffusion.from_pretrained(out, tokenizer=str(path), single_file_options=options)
    np.testing.assert_array_equal(single.tokenize(["a cat"], 2), sd.tokenize(["a cat"], 2))  # from path/tokenizer_2
    c, want_c = single.configs, sd.configs
    assert (c.unet, c.vae, c.is_sdxl, c.requires_aesthetics_score) == (
        want_c.unet, want_c.vae, True, model == "refiner")
    # The file holds no token ids (a loaded one has the real CLIP vocabularies', not the tiny model's own),
    # nor CLIP-L's unused projection width.
    for name in ("text_encoder", "text_encoder_2"):
        got, want = getattr(c, name), getattr(want_c, name)
        if want is None:
            assert got is None
            continue
        unread = dict(bos_token_id=want.bos_token_id, eos_token_id=want.eos_token_id, pad_token_id=want.pad_token_id)
        if not want.with_projection:
            unread["projection_dim"] = want.projection_dim
        assert dataclasses.replace(got, **unread) == want, name
    a, b = traverse_util.flatten_dict(single.params, sep="/"), traverse_util.flatten_dict(sd.params, sep="/")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "linear_1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def peft_lora(folder, tmp_path_factory):
    """A random LoRA on the UNet (with its add_embedding) and both text encoders, saved by diffusers."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    torch.manual_seed(0)
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS),
               "text_encoder": LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=TEXT_TARGETS),
               "text_encoder_2": LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=TEXT_TARGETS)}
    for name, config in configs.items():
        inject_adapter_in_model(config, getattr(pipe, name))
    out = tmp_path_factory.mktemp("sdxl-lora") / "peft"
    StableDiffusionXLPipeline.save_lora_weights(
        out, safe_serialization=True,
        **{f"{name}_lora_layers": get_peft_model_state_dict(getattr(pipe, name)) for name in configs},
        **{f"{name}_lora_adapter_metadata": config.to_dict() for name, config in configs.items()})
    return out / "pytorch_lora_weights.safetensors"


def to_kohya_sgm(peft_file, out_file):
    """The same adapters as kohya writes SDXL's: the UNet under the original (sgm) module names,
    lora_te1_ / lora_te2_, lora_down / lora_up and an alpha per layer."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file
    from sdjax.checkpoints.name_tables import UNetLayout, unet_table

    with safe_open(str(peft_file), "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    tensors = {}
    with safe_open(str(peft_file), "np") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    unet_modules = sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in tensors if k.startswith("unet.")})
    originals = unet_table(UNetLayout.from_diffusers(unet_modules)).original_names(unet_modules, "UNet")
    out = {}
    for key, value in tensors.items():
        network, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        name = {"unet": lambda m: "lora_unet_" + originals[m].replace(".", "_"),
                "text_encoder": lambda m: "lora_te1_text_model_" + m.removeprefix("text_model.").replace(".", "_"),
                "text_encoder_2": lambda m: "lora_te2_text_model_" + m.removeprefix("text_model.").replace(".", "_"),
                }[network](module)
        out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = np.asarray(meta[f"{network}.lora_alpha"], np.float32)
    save_file(out, str(out_file))
    return out_file


@pytest.mark.parametrize("layout", ["peft", "kohya_sgm"])
def test_lora_on_unet_and_both_text_encoders_equals_diffusers(folder, peft_lora, layout, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    sd = StableDiffusion.from_pretrained(folder)
    lora = peft_lora if layout == "peft" else to_kohya_sgm(peft_lora, tmp_path / "kohya.safetensors")
    if layout == "kohya_sgm":
        from safetensors.numpy import load_file
        keys = list(load_file(str(lora)))
        assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and any("lora_te2_" in k for k in keys)
    prompts = ["a red circle", "a green triangle"]
    noise = generate.starting_noise(5, 2, (16, 16, 4))
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32)
    ours = sd.with_lora(lora, scale=0.7).txt2img(prompts, sampler="euler", init_latents=noise, output="float", **kw)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    ref = pipe(prompts, latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))),
               output_type="np", **kw).images
    assert np.abs(ours - ref).mean() <= 3e-4, np.abs(ours - ref).mean()
    plain = sd.txt2img(prompts, sampler="euler", init_latents=noise, output="float", **kw)
    assert np.abs(ref - plain).mean() > 0.01  # the LoRA changes the images


def test_aot_txt2img_program_is_the_one_the_api_runs(folder):
    """sdjax.aot compiles SDXL's txt2img from shapes alone (both tokenizers' ids, the micro-conditioning,
    the zero-conditioning flag); run on the tiny model's parameters, that program gives the API's images."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sdjax import aot, sharding
    from sdjax.samplers import get_sampler

    sd = StableDiffusion.from_pretrained(folder)
    devices = jax.devices()
    compiled, batch, size = aot.compile_txt2img(sd.configs, devices, 1, 3, "float32", size=32, sampler="euler")
    prompts = [f"a shape number {i}" for i in range(batch)]
    opts = options.SamplingOptions(steps=3, sampler="euler", guidance_scale=5.0, seed=1, output="float",
                                   original_size=(64, 48))
    inputs = sd.inputs(opts.request(sd._model, prompts, "blurry"))
    mesh = sharding.data_mesh(devices)
    put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))  # noqa: E731
    plan = get_sampler("euler").make_plan(sd.configs.scheduler, 3)
    key = jax.random.fold_in(jax.random.key(1), generate.SAMPLER_STREAM)
    got = compiled(put(sd.params, P()), put(inputs, P("data")), put(key, P()), put(plan, P()),
                   put(jnp.float32(5.0), P()), put(jnp.float32(sd.scaling_factor), P()))
    want = sd.txt2img(prompts, negative_prompts="blurry", steps=3, sampler="euler", guidance_scale=5.0, seed=1,
                      output="float", original_size=(64, 48))
    assert size == 32 and got.shape == want.shape == (batch, 32, 32, 3)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_presets_count_the_published_sdxl_networks(capsys):
    """``python -m sdjax.params --preset sdxl`` / ``sdxl_refiner``: the counts of diffusers' networks built
    from the published configs (UNet, ViT-L, ViT-bigG with projection, the SD VAE)."""
    from sdjax import params

    params.main(["--preset", "sdxl"])
    out = capsys.readouterr().out
    for name, n in (("unet", "2,567,463,684"), ("text_encoder", "123,060,480"), ("text_encoder_2", "694,659,840"),
                    ("vae", "83,653,863")):
        assert re.search(rf"^{name}\s+{n}$", out, re.M), out
    counts = params.param_counts(presets.get("sdxl_refiner"))
    assert counts["unet"] == 2_259_526_660 and "text_encoder" not in counts


def test_sdxl_generation_sharded_over_eight_devices_equals_one(folder):
    """The batch split over the 8 CPU devices gives the images one device gives (SDXL's extra inputs are
    split with it)."""
    from jax.sharding import Mesh

    sd = StableDiffusion.from_pretrained(folder)
    assert len(jax.devices()) == 8
    prompts = ["a red circle", "a cat", "a dog"]
    kw = dict(steps=2, sampler="euler", seed=3, output="float", original_size=(48, 64), negative_prompt="blurry")
    eight = sd.txt2img(prompts, **kw)
    sd.generator = generate.Generator(sd.generator.nets, sd.configs.scheduler,
                                      mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    one = sd.txt2img(prompts, **kw)
    np.testing.assert_allclose(eight, one, atol=1e-5)


def _training_step_parts(sd: StableDiffusion, caption_dropout: float = 0.0):
    """The latent trainer's step settings and frozen arrays for ``sd`` (its UNet as the trained network)."""
    from sdjax.diffusion.schedule import alphas_cumprod
    from sdjax.training.latent_step import LatentStep

    nets = sd.generator.nets
    step = LatentStep(unet=nets.unet, vae=nets.vae, text_encoder=nets.text_encoder, text_encoder_2=nets.text_encoder_2,
                      train_text_encoder=False, prediction_type="epsilon", num_train_timesteps=1000,
                      caption_dropout=caption_dropout, min_snr_gamma=None, grad_accum=1, ema_decay=0.0)
    frozen = {name: sd.params[name] for name in ("vae", "text_encoder", "text_encoder_2")}
    frozen |= {"empty_ids": sd.tokenize([""])[0], "alphas_cumprod": alphas_cumprod(sd.configs.scheduler)}
    return step, frozen


def test_training_conditioning_equals_diffusers_sdxl_training_script(folder):
    """The latent step's SDXL conditioning (both encoders' penultimate states, the second's pooled
    embedding, each example's original size and crop offset, then the trained size) gives the UNet
    output that diffusers' train_text_to_image_sdxl.py computes for the same batch; a dropped caption's
    context and pooled embedding are zero; different original sizes give different losses."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdjax.training.latent_step import conditioning, micro_loss

    sd = StableDiffusion.from_pretrained(folder)
    step, frozen = _training_step_parts(sd)
    prompts = ["a red circle on a blue background", "a green triangle"]
    micro = {"input_ids": sd.tokenize(prompts), "input_ids_2": sd.tokenize(prompts, encoder=2),
             "original_size": np.asarray([[40, 40], [32, 48]], np.int32),
             "crop_top_left": np.asarray([[0, 4], [3, 0]], np.int32)}
    no_drop = np.zeros(2, bool)
    ctx, added = conditioning({}, frozen, micro, no_drop, (24, 40), step)
    x_t = np.random.default_rng(0).standard_normal((2, 12, 20, 4)).astype(np.float32)
    t = np.asarray([10, 700], np.int32)
    ours = np.asarray(step.unet.apply({"params": sd.params["unet"]}, x_t, t, ctx, added))

    with torch.no_grad():
        embeds = []
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            key = "input_ids" if name == "text_encoder" else "input_ids_2"
            out = cls.from_pretrained(folder / name)(torch.from_numpy(micro[key]).long(), output_hidden_states=True,
                                                      return_dict=False)
            pooled, embeds = out[0], embeds + [out[-1][-2]]
        time_ids = torch.tensor([[40, 40, 0, 4, 24, 40], [32, 48, 3, 0, 24, 40]], dtype=torch.float32)
        ref = UNet2DConditionModel.from_pretrained(folder / "unet")(
            torch.from_numpy(x_t.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(), torch.cat(embeds, dim=-1),
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.numpy().transpose(0, 2, 3, 1)
    assert ours.shape == ref.shape == (2, 12, 20, 4)
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())

    dropped_ctx, dropped = conditioning({}, frozen, micro, np.asarray([True, False]), (24, 40), step)
    assert not np.asarray(dropped_ctx[0]).any() and not np.asarray(dropped.text_embeds_BP[0]).any()
    np.testing.assert_array_equal(np.asarray(dropped_ctx[1]), np.asarray(ctx[1]))
    np.testing.assert_array_equal(np.asarray(dropped.time_ids_BK), np.asarray(added.time_ids_BK))

    rng = np.random.default_rng(1)
    batch = dict(micro, moments=np.concatenate([rng.standard_normal((2, 12, 20, 4)),
                                                np.full((2, 12, 20, 4), -8.0)], -1).astype(np.float32))
    loss = lambda b: float(micro_loss({"unet": sd.params["unet"]}, frozen, b, jax.random.key(0),  # noqa: E731
                                      np.float32(0.13025), step))
    other = dict(batch, original_size=np.asarray([[80, 80], [64, 96]], np.int32))
    assert loss(batch) == loss(dict(batch)) != loss(other)


def test_cached_text_embeddings_equal_diffusers_encode_prompt_and_give_the_steps_loss(folder, tmp_path):
    """``train.cache_text`` (with ``cache_latents``) on SDXL: the cache holds each caption's context
    (both encoders' penultimate states) and pooled embedding as diffusers' StableDiffusionXLPipeline
    encodes them, beside each image's moments, original size and crop, in the shapes the step is
    compiled for; the step's loss on them equals its loss on the captions' ids (same key)."""
    from diffusers import StableDiffusionXLPipeline

    from sdjax import configs as config_files
    from sdjax.training import latent, latent_step
    from tests.helpers import write_image_folder

    c = config_files.load("sdxl_finetune:tiny")
    c.pretrained, c.mesh.shape = str(folder), (1, 1)
    c.data.update(manual_dir=str(write_image_folder(tmp_path / "images", 6)), data_dir=str(tmp_path / "tfds"))
    c.train.update(batch_size=2, cache_latents=True, cache_text=True, caption_dropout=0.5)
    run = latent.build(c, str(tmp_path / "run"), devices=jax.devices()[:1])
    source = latent.cached_latents(run)
    rows = [source[i] for i in range(len(source))]
    cached = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    assert set(cached) == {"moments", "text_embeds", "pooled_embeds", "original_size", "crop_top_left"}
    spec = run.batch_spec(32, 32)
    assert {k: (len(cached[k]),) + spec[k].shape[1:] for k in spec} == {k: v.shape for k, v in cached.items()}

    data = run.dataset.as_data_source(split=run.config.data.split)
    captions = [data[i][run.config.data.text_key].decode() for i in range(len(source))]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    with torch.no_grad():
        ctx, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    np.testing.assert_allclose(cached["text_embeds"], ctx.numpy(), atol=1e-5)
    np.testing.assert_allclose(cached["pooled_embeds"], pooled.numpy(), atol=1e-5)

    state = latent.init_state(run)
    ids = run.token_ids(captions)
    common = {k: cached[k] for k in ("moments", "original_size", "crop_top_left")}
    loss = jax.jit(lambda micro, key: latent_step.micro_loss(state.params, run.frozen, micro, key, 0.13025, run.step))
    for seed in range(3):  # caption dropout 0.5: dropped and kept captions
        from_cache = loss(common | {k: cached[k] for k in ("text_embeds", "pooled_embeds")}, jax.random.key(seed))
        from_ids = loss(common | ids, jax.random.key(seed))
        np.testing.assert_allclose(from_cache, from_ids, rtol=1e-5)


@pytest.mark.slow
def test_docs_sdxl_fine_tune_and_lora_commands(folder, tmp_path):
    """docs/training.md's two SDXL commands with the tiny config on the tiny SDXL folder. The fine-tune
    (in two aspect-ratio buckets) keeps the autoencoder and both text encoders bit for bit and moves
    the UNet a little; the LoRA run (UNet and both text encoders, from cached latents: the cache
    keeps both tokenizers' ids and each image's original size and crop) exports a file that
    diffusers' StableDiffusionXLPipeline loads into the images sdjax's with_lora gives, and kohya's
    layout of the same adapters reads back to the same images."""
    import json
    import os
    import shlex
    import subprocess
    import sys

    from safetensors import safe_open

    from sdjax.checkpoints import lora as lora_files
    from tests.helpers import readme_block, subprocess_env, write_image_folder

    full_cmd, lora_cmd = readme_block("## SDXL: fine-tune and LoRA", "docs/training.md")
    write_image_folder(tmp_path / "my_images", 12)

    def run(command: str, *extra: str) -> str:
        args = [a.replace("=stable-diffusion-xl-base-1.0", f"={folder}") for a in shlex.split(command)]
        args[0] = os.path.join(os.path.dirname(sys.executable), os.path.basename(args[0]))
        args = ["sdxl_finetune:tiny" if a == "sdxl_finetune" else a for a in args]
        done = subprocess.run(args + [f"--config.data.data_dir={tmp_path / 'tfds'}", *extra], cwd=tmp_path,
                              env=subprocess_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "step 4/4" in done.stdout + done.stderr
        return done.stdout + done.stderr

    flat = lambda tree: {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}  # noqa: E731
    out = run(full_cmd, "--config.data.buckets=32x32,24x40")
    assert "compiled the step for 2 buckets: 32x32, 24x40" in out
    base, tuned = StableDiffusion.from_pretrained(folder), StableDiffusion.from_pretrained(tmp_path / "runs/xl-export")
    assert tuned.configs == base.configs
    assert tuned.tokenizer_2.get_vocab() == base.tokenizer_2.get_vocab() and tuned.tokenizer_2.pad_token == "!"
    for name in ("vae", "text_encoder", "text_encoder_2"):  # frozen: bit for bit
        for k, v in flat(base.params[name]).items():
            np.testing.assert_array_equal(flat(tuned.params[name])[k], v, err_msg=name + k)
    diff = max(np.abs(flat(tuned.params["unet"])[k] - v).max() for k, v in flat(base.params["unet"]).items())
    assert 0 < diff < 5e-5  # 4 Adam steps at 1e-5 from the checkpoint's UNet
    assert len(list((tmp_path / "runs/xl/samples").glob("samples_*.png"))) == 2

    # A learning rate that moves the adapters visibly in 4 steps, so a misplaced adapter would show.
    assert "cached latents" in run(lora_cmd, "--config.train.learning_rate=3e-2", "--config.train.cache_latents=True")
    cache = tmp_path / "runs/xl-lora/latent_cache"
    cached = {k: np.load(cache / f"{k}-000000.npy") for k in ("original_size", "crop_top_left", "input_ids",
                                                              "input_ids_2")}
    want = [(40, 40, 0, 0) if i % 2 else (32, 48, 0, 8) for i in range(12)]  # the folder's images, centre crops
    got = np.concatenate([cached["original_size"], cached["crop_top_left"]], axis=1)
    assert sorted(map(tuple, got.tolist())) == sorted(want)
    assert (cached["input_ids"][:, -1] != cached["input_ids_2"][:, -1]).all()  # the second tokenizer pads with "!"
    lora_file = tmp_path / "runs/my-xl-lora/pytorch_lora_weights.safetensors"
    with safe_open(str(lora_file), "np") as f:
        ups = {k: f.get_tensor(k) for k in f.keys() if k.endswith("lora_B.weight")}
        meta = json.loads(f.metadata()[lora_files.METADATA_KEY])
    # Every adapter trained away from PEFT's zero start but the first encoder's last layer's: SDXL reads
    # that encoder's penultimate state (the second's last layer makes its pooled embedding).
    last = f"text_encoder.text_model.encoder.layers.{base.configs.text_encoder.num_hidden_layers - 1}."
    for network in ("unet", "text_encoder", "text_encoder_2"):
        mine = {k: v for k, v in ups.items() if k.startswith(network + ".")}
        assert meta[f"{network}.r"] == 16 and mine, network
        for k, v in mine.items():
            assert (np.abs(v).max() > 0) != k.startswith(last), k
    keys = list(ups)
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    ours = _lora_images_equal_diffusers(folder, base, lora_file)
    kohya = lora_files.save(str(tmp_path / "kohya"), lora_files.read(str(lora_file)), "kohya")
    with safe_open(kohya, "np") as f:
        assert {k.split("_text_model")[0] for k in f.keys() if "_te" in k} == {"lora_te1", "lora_te2"}
    again = base.with_lora(kohya).txt2img(_LORA_PROMPTS, sampler="euler", init_latents=_LORA_NOISE, output="float",
                                          **_LORA_KW)
    np.testing.assert_allclose(again, ours, atol=1e-6)


_LORA_PROMPTS, _LORA_NOISE = ["a red circle", "a green triangle"], generate.starting_noise(5, 2, (16, 16, 4))
_LORA_KW = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32)


def _lora_images_equal_diffusers(folder, base: StableDiffusion, lora_file) -> np.ndarray:
    """sdjax's ``with_lora`` images of ``lora_file`` (a diffusers/PEFT export) equal those of diffusers'
    StableDiffusionXLPipeline after ``load_lora_weights`` within 3e-4, and differ from the plain model's."""
    from diffusers import StableDiffusionXLPipeline

    ours = base.with_lora(lora_file).txt2img(_LORA_PROMPTS, sampler="euler", init_latents=_LORA_NOISE,
                                             output="float", **_LORA_KW)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    ref = pipe(_LORA_PROMPTS, latents=torch.from_numpy(np.ascontiguousarray(_LORA_NOISE.transpose(0, 3, 1, 2))),
               output_type="np", **_LORA_KW).images
    assert np.abs(ours - ref).mean() <= 3e-4, np.abs(ours - ref).mean()
    plain = base.txt2img(_LORA_PROMPTS, sampler="euler", init_latents=_LORA_NOISE, output="float", **_LORA_KW)
    assert np.abs(ours - plain).mean() > 3e-3  # the adapters change the images
    return ours


@pytest.mark.slow
def test_sdxl_lora_run_killed_resumes_bitwise_and_its_unet_only_export_loads_in_diffusers(folder, tmp_path):
    """SIGKILL to an SDXL LoRA run (UNet adapters only, from a folder's images encoded once with their
    captions' text embeddings: train.cache_latents and train.cache_text) after its second checkpoint:
    the same command resumes from the last checkpoint and ends with an uninterrupted run's train
    state and export bit for bit, and that export (no text-encoder adapters) loads in diffusers'
    StableDiffusionXLPipeline into the images sdjax's with_lora gives."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.numpy import load_file

    from tests.helpers import saved_state, subprocess_env, write_image_folder

    write_image_folder(tmp_path / "images", 12)
    steps, logs = 8, {}

    def start(run: str, log: str) -> subprocess.Popen:
        cmd = [os.path.join(os.path.dirname(sys.executable), "sdjax-train"), "latent", "--config", "sdxl_finetune:tiny",
               "--workdir", str(tmp_path / run), "--export", str(tmp_path / run / "export"),
               f"--config.pretrained={folder}", "--config.lora.rank=4", "--config.train.learning_rate=3e-2",
               "--config.data.name=captioned_images", f"--config.data.manual_dir={tmp_path / 'images'}",
               f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.train.steps={steps}",
               "--config.train.checkpoint_every=1", "--config.train.sample_every=0",
               "--config.train.cache_latents=True", "--config.train.cache_text=True"]
        logs[log] = tmp_path / f"{log}.log"
        with open(logs[log], "w") as f:
            return subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT)

    def finish(proc: subprocess.Popen, log: str) -> str:
        assert proc.wait(timeout=600) == 0, logs[log].read_text()[-3000:]
        return logs[log].read_text()

    straight = finish(start("straight", "straight"), "straight")
    assert f"step {steps}/{steps}" in straight and "cached latents" in straight
    victim = start("victim", "killed")
    try:
        deadline = time.time() + 600
        while not (tmp_path / "victim/checkpoints/2/state").exists():  # Orbax renames a step's folder when done
            assert victim.poll() is None and time.time() < deadline, logs["killed"].read_text()[-3000:]
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        victim.kill()
    assert not (tmp_path / f"victim/checkpoints/{steps}").exists(), "the run ended before it was killed"
    resumed = finish(start("victim", "finished"), "finished")
    resumed_at = int(re.search(r"resumed from step (\d+)", resumed).group(1))
    assert 2 <= resumed_at < steps
    got, want = (saved_state(str(tmp_path / run / "checkpoints" / str(steps))) for run in ("victim", "straight"))
    assert got.keys() == want.keys() and any("lora" in k for k in want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    lora_file = tmp_path / "straight/export/pytorch_lora_weights.safetensors"
    exported, again = load_file(lora_file), load_file(tmp_path / "victim/export/pytorch_lora_weights.safetensors")
    assert exported.keys() == again.keys() and {k.split(".")[0] for k in exported} == {"unet"}
    for k in exported:
        np.testing.assert_array_equal(again[k], exported[k], err_msg=k)
    _lora_images_equal_diffusers(folder, StableDiffusion.from_pretrained(folder), lora_file)
