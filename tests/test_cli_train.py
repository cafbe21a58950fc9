"""The training command line: its own errors, raised before anything is built or written, and the
two-phase commands of docs/training.md on the synthetic shapes set (run as written, shortened by flags; the own
images commands run in test_own_data)."""

import gc
import json
import os
import shlex
import subprocess
import sys

import pytest
from PIL import Image

from sdjax import configs
from sdjax import cli
from sdjax.cli import train
from tests.helpers import SHORT, readme_block, subprocess_env


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train.main(["sdjax-train"] + argv)
    assert e.value.code not in (0, None)
    captured = capsys.readouterr()
    return str(e.value) if isinstance(e.value.code, str) else captured.err


def test_a_command_line_process_collects_less_often_and_a_python_caller_keeps_its_settings():
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        cli.tune_gc(["sdjax-train", "latent"])  # main(argv) called from Python
        assert gc.get_threshold() == (700, 10, 10)
        cli.tune_gc(None)  # main() of a console script or train/*.py: the process is the command's
        assert gc.get_threshold() == cli.COMMAND_GC_THRESHOLD and cli.COMMAND_GC_THRESHOLD[0] > 700
    finally:
        gc.set_threshold(*before)


def test_config_by_name_or_path():
    assert configs.resolve("tiny") == os.path.join(os.path.dirname(configs.__file__), "tiny.py")
    assert configs.resolve("tiny:x").endswith("tiny.py:x")
    assert configs.resolve(configs.resolve("tiny")) == configs.resolve("tiny")
    assert configs.load("tiny").train.batch_size == 32


def test_unknown_key_names_the_valid_ones(tmp_path, capsys):
    err = _fails(["latent", "--config", "tiny", "--workdir", str(tmp_path / "w"), "--config.train.batchsize=4"], capsys)
    assert err.startswith("error: --config.train.batchsize: train has no key 'batchsize'; valid keys there:")
    assert "batch_size" in err and "Traceback" not in err
    err = _fails(["latent", "--config=tiny", "--workdir", str(tmp_path / "w"), "--config.nosection.x=1"], capsys)
    assert "the config has no key 'nosection'" in err and "train" in err
    assert not (tmp_path / "w").exists()


def test_unknown_config_and_missing_phase(tmp_path, capsys):
    err = _fails(["latent", "--config", "nosuch", "--workdir", str(tmp_path)], capsys)
    assert "nosuch: no such config file" in err and "tiny_autoencoder" in err
    assert "the phase, one of autoencoder, latent" in _fails(["--config", "tiny"], capsys)


@pytest.mark.slow
def test_readme_two_phase_commands_train_export_and_sample(tmp_path):
    commands = readme_block("## Training: two phases", "docs/training.md")
    assert [c.split()[0] for c in commands] == [".venv/bin/sdjax-train"] * 2 + [".venv/bin/sdjax-txt2img"]
    env = subprocess_env()
    outputs = []
    for command in commands:
        args = shlex.split(command)
        args[0] = os.path.join(os.path.dirname(sys.executable), os.path.basename(args[0]))
        if "sdjax-train" in args[0]:
            args += [f.format(steps=4) for f in SHORT[args[1]]]
            args.append(f"--config.data.data_dir={tmp_path / 'tfds'}")  # not the user's ~/tensorflow_datasets
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        outputs.append(r.stdout + r.stderr)
    assert "step 4: held-out PSNR" in outputs[0] and "step 4/4" in outputs[1]
    assert json.loads((tmp_path / "runs" / "vae-export" / "vae.json").read_text())
    assert (tmp_path / "runs" / "ldm" / "checkpoints" / "4").is_dir()
    images = sorted((tmp_path / "outputs").glob("0*.png"))
    assert len(images) == 4 and all(Image.open(p).size == (32, 32) for p in images)  # --n-samples 4, tiny's size
