"""The README's first command, ``./run demo`` (= ``sdjax-demo``), end to end through its real command
lines, with every phase shortened: data, both training phases, sampling, scoring and the report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import subprocess_env


@pytest.mark.slow
def test_demo_runs_every_phase(tmp_path):
    env = subprocess_env(devices=None)  # the demo sets its own device count
    cmd = [os.path.join(os.path.dirname(sys.executable), "sdjax-demo"), "--workdir", str(tmp_path / "demo"),
           "--ae-steps", "10", "--latent-steps", "12", "--n-samples", "1", "--sample-steps", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for phase in ("1/5 preparing", "2/5 training the autoencoder", "3/5 training latent diffusion",
                  "4/5 sampling", "5/5 scoring"):
        assert phase in r.stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["scores"]["seen"]["images"] == 30 and report["scores"]["held_out"]["images"] == 6
    assert report["judge_on_real_images"]["shape"] >= 0.99  # the judge itself is sound
    from PIL import Image
    with Image.open(tmp_path / "demo" / "pairs.png") as grid:  # a row per shape/colour pair, 8 columns of 32 px
        assert grid.size == (8 * 32, 18 * 32)
    assert (tmp_path / "demo" / "model" / "sdjax.json").is_file() and (tmp_path / "demo" / "vae" / "vae.json").is_file()

    # The trained model leaves sdjax: diffusers samples the same images from its exported folder.
    from diffusers import StableDiffusionPipeline

    from sdjax import generate
    from sdjax.stable_diffusion import StableDiffusion

    model, exported = tmp_path / "demo" / "model", tmp_path / "demo" / "diffusers"
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "sdjax-convert"), str(model), str(exported),
                        "--to", "diffusers"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    sd = StableDiffusion.from_pretrained(model)
    prompts = ["a red circle on a blue background", "a green triangle on a yellow background"]
    f, size = sd.downsample_factor, sd.native_size
    noise = generate.starting_noise(0, len(prompts), (size // f, size // f, sd.configs.unet.in_channels))
    ours = sd.txt2img(prompts, steps=10, guidance_scale=5.0, init_latents=noise, output="float")
    pipe = StableDiffusionPipeline.from_pretrained(exported)
    ref = pipe(prompts, num_inference_steps=10, guidance_scale=5.0, height=size, width=size,
               latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))), output_type="np").images
    assert np.abs(ours - ref).mean() <= 3e-4
