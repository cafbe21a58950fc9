"""The inpainting and export commands of the README and docs/ (sampling.md, checkpoints.md), run as written
(plus a few shortening flags) through the installed console scripts on a tiny 9-channel inpainting checkpoint."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

from sdjax.stable_diffusion import StableDiffusion
from tests import tiny_models
from tests.helpers import readme_block, subprocess_env


def _argv(command: str, checkpoint: Path) -> list[str]:
    args = [str(checkpoint) if a == "CKPT" else a for a in shlex.split(command)]
    args[0] = os.path.join(os.path.dirname(sys.executable), os.path.basename(args[0]))
    return args


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def test_readme_inpaint_and_convert_commands(tmp_path):
    ckpt = tiny_models.save_pipeline(tmp_path / "ckpt", "sd1", seed=5, inpainting=True)
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)  # 16 wide, 24 high
    mask = np.zeros((24, 16), np.uint8)
    mask[4:12, 2:10] = 255
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")

    [inpaint] = readme_block("## Inpainting", "docs/sampling.md")
    args = _argv(inpaint, ckpt) + ["--steps", "3", "--n-samples", "2", "--seed", "3"]
    done = _run(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    pngs = sorted((tmp_path / "outputs").glob("0*.png"))
    assert len(pngs) == 2 and (tmp_path / "outputs" / "grid-0000.png").is_file()
    meta = json.loads(pngs[1].with_suffix(".json").read_text())
    assert meta["mask"] == str(tmp_path / "mask.png") and meta["strength"] == 1.0
    want = StableDiffusion.from_pretrained(ckpt).inpaint(photo, mask, ["a red sofa"] * 2, steps=3, seed=3)
    got = np.asarray(Image.open(pngs[1]))
    assert got.shape == (24, 16, 3) and np.abs(got.astype(int) - want[1]).max() <= 1
    Image.fromarray(mask[:16]).save(tmp_path / "mask.png")  # now smaller than the photo
    bad = _run(args, tmp_path)
    assert bad.returncode != 0 and "give a mask of the image's size" in bad.stderr

    from diffusers import StableDiffusionInpaintPipeline

    to_diffusers, to_single_file = readme_block("## Models and formats")
    assert readme_block("## Exporting to diffusers", "docs/checkpoints.md") == [to_diffusers, to_single_file]
    for command in (to_diffusers, to_single_file):
        done = _run(_argv(command, ckpt), tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "wrote exports/" in done.stdout
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "exports" / "my-model")
    assert pipe.unet.config.in_channels == 9
    original = load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(tmp_path / "exports" / "my-model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    single = load_file(str(tmp_path / "exports" / "my-model.safetensors"))
    assert single["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    assert {v.dtype for k, v in single.items() if not k.endswith("position_ids")} == {np.dtype(np.float16)}

    missing = _run(_argv(to_diffusers.replace("CKPT", "no-such-model"), ckpt), tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "no such file" in missing.stderr
