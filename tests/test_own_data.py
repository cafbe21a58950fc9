"""docs/training.md's "your own captioned images" commands, run as written through the real command lines
(shortened by a few flags), on a folder with a corrupt image, a missing caption and a malformed
line: both phases train, checkpoint, resume and export (as diffusers folders), and the exported model samples."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sdjax.stable_diffusion import StableDiffusion
from tests.helpers import SHORT, readme_block, subprocess_env, write_image_folder


def _run(cmd: list[str], cwd: Path) -> str:
    env = subprocess_env()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.mark.slow
def test_readme_own_image_commands_train_resume_export_and_sample(tmp_path):
    commands = readme_block("## Your own captioned images", "docs/training.md")
    assert [c.split()[0] for c in commands] == [".venv/bin/sdjax-train"] * 2 + [".venv/bin/sdjax-txt2img"]
    write_image_folder(tmp_path / "my_images", 20)
    bin_dir = os.path.dirname(sys.executable)

    def argv(command: str, steps: int) -> list[str]:
        args = shlex.split(command)
        args[0] = os.path.join(bin_dir, os.path.basename(args[0]))
        if "sdjax-train" in args[0]:
            args += [f.format(steps=steps) for f in SHORT[args[1]]]
            args.append(f"--config.data.data_dir={tmp_path / 'tfds'}")  # not the user's ~/tensorflow_datasets
        return args

    ae, ldm, sample = commands
    out = _run(argv(ae, 4), tmp_path)
    assert "prepared 20 examples; skipped 1 unreadable image (corrupt.png), 1 entry without caption (nocaption.png), " \
           "1 malformed metadata line (line 23)" in out
    assert "training on captioned_images[train[:-1]], evaluating on [train[-1:]]" in out  # 2% of 20, held out
    assert "step 4: held-out PSNR" in out
    out = _run(argv(ae, 6), tmp_path)  # the same command again, further: resumes at step 4
    assert "step 5/6" in out and "step 1/6" not in out
    vae_config = json.loads((tmp_path / "runs" / "my-vae-export" / "config.json").read_text())
    assert vae_config["_class_name"] == "AutoencoderKL"  # --export-format diffusers

    out = _run(argv(ldm, 4), tmp_path)
    assert "step 4/4" in out and (tmp_path / "runs" / "my-ldm" / "checkpoints" / "4").is_dir()
    # data.buckets: the square PNGs and the wide JPEGs in their buckets, none tall; a step per bucket.
    assert re.search(r"data.buckets: \d+ images sized in [\d.]+ s; 40x24: 0, 32x32: 10, 24x40: 10;", out), out[-3000:]
    assert "compiled the step for 3 buckets: 40x24, 32x32, 24x40" in out
    out = _run(argv(ldm, 6), tmp_path)
    assert "step 5/6" in out and "step 1/6" not in out
    assert sorted(p.name for p in (tmp_path / "runs" / "my-ldm" / "samples").glob("*.png")) == [
        f"samples_{s:07d}.png" for s in (2, 4, 6)]
    from diffusers import StableDiffusionPipeline

    export = tmp_path / "runs" / "my-ldm-export"
    assert StableDiffusionPipeline.from_pretrained(export).unet.config.in_channels == 4  # a diffusers folder
    sd = StableDiffusion.from_pretrained(export)
    vocab = json.loads((tmp_path / "runs" / "my-ldm-export" / "tokenizer" / "vocab.json").read_text())
    assert {"circle</w>", "square</w>", "triangle</w>", "background</w>"} <= set(vocab)  # words of the captions
    assert sd.tokenizer.tokenize("a red circle on a blue background") == [
        "a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "blue</w>", "background</w>"]

    _run(argv(sample, 0) + ["--steps", "2", "--n-samples", "2"], tmp_path)
    assert len(list((tmp_path / "outputs").glob("0*.png"))) == 2
