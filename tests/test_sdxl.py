"""SDXL: a tiny random StableDiffusionXLPipeline built and saved by diffusers, loaded by sdjax, its
images equal to diffusers' from the same starting latents."""

import numpy as np
import pytest
import torch

from sdjax import generate
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
    with pytest.raises(NotImplementedError, match="SDXL"):
        sd.save_pretrained("unused", format="diffusers")


@pytest.mark.parametrize("case", ["euler", "ddim_negative_prompt_and_micro", "negative_micro"])
def test_txt2img_equals_diffusers(folder, case):
    """Euler with no negative prompt (a zero negative conditioning); DDIM with negative prompts and other
    micro-conditioning numbers; other negative micro-conditioning: against StableDiffusionXLPipeline
    from the same latents. The last with one prompt: diffusers repeats the [negative, positive] pair of
    time ids per image, which pairs them with the wrong rows when several images have a negative
    micro-conditioning of their own; sdjax gives every image's negative row the negative numbers."""
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
    if case == "negative_micro":
        prompts = prompts[:1]
        kw.update(negative_original_size=(16, 16), negative_crops_coords_top_left=(4, 4), negative_target_size=(32, 24))
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
