"""sdjax as a user installs it: a wheel built from the checkout, installed (non-editable, without the
[train] extra) into a fresh virtual environment, used from a folder outside the checkout; and the
Colab notebook run top to bottom in that environment, its install cell installing the wheel."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image

from tests import tiny_models

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "sdjax_colab.ipynb"
KERNEL = "sdjax-notebook-test"
DEVICES, BATCH = 2, 2


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(wheel, fresh venv) with sdjax's runtime dependencies and ipykernel, but not sdjax itself: pip
    resolves the wheel's declared dependencies, then sdjax is uninstalled again so that the notebook's
    install cell has something to do."""
    root = tmp_path_factory.mktemp("install")
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", REPO, "-w", root / "dist"])
    assert r.returncode == 0, r.stderr
    (wheel,) = (root / "dist").glob("sdjax-*.whl")
    r = _run([sys.executable, "-m", "venv", root / "venv"])
    assert r.returncode == 0, r.stderr
    python = root / "venv" / "bin" / "python"
    # --no-compile: no .pyc for every installed module (half this install's time); what runs compiles its own
    r = _run([python, "-m", "pip", "install", "-q", "--no-compile", wheel, "ipykernel"])
    assert r.returncode == 0, r.stderr
    r = _run([python, "-m", "pip", "check"])
    assert r.returncode == 0, r.stdout + r.stderr  # every dependency's own requirements are met
    r = _run([python, "-m", "pip", "uninstall", "-q", "-y", "sdjax"])
    assert r.returncode == 0, r.stderr
    return wheel, root / "venv"


def _env(**extra) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH pointing into the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    return dict(env, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", **extra)


def _outputs(cell, output_type: str) -> list:
    return [o for o in cell.get("outputs", []) if o["output_type"] == output_type]


@pytest.mark.slow
def test_notebook_installs_the_wheel_and_runs_on_a_tiny_checkpoint(venv, tmp_path, monkeypatch):
    wheel, env_dir = venv
    folder = tiny_models.save_pipeline(tmp_path / "sd1", "sd1", seed=0)
    export = tmp_path / "export"
    env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", SDJAX_NOTEBOOK_SOURCE=str(wheel),
               SDJAX_NOTEBOOK_CHECKPOINT=str(folder), SDJAX_NOTEBOOK_DTYPE="float32", SDJAX_NOTEBOOK_SIZE="16",
               SDJAX_NOTEBOOK_STEPS="2", SDJAX_NOTEBOOK_BATCH=str(BATCH), SDJAX_NOTEBOOK_EXPORT_DIR=str(export))
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [str(env_dir / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps(dict(argv=argv, display_name=KERNEL, language="python", env=env)))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"  # what Colab starts
    assert "YOUR-ORG" not in NOTEBOOK.read_text()  # no placeholder to edit

    # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
    nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "every code cell ran"
    assert not any(_outputs(c, "error") for c in code)
    text = "".join(o["text"] for c in code for o in _outputs(c, "stream") if o["name"] == "stdout")
    assert re.search(rf"sdjax 0\.1\.0 from {re.escape(str(env_dir))}/lib/python[\d.]+/site-packages/sdjax/", text), text
    assert f"on cpu: {DEVICES} x cpu" in text  # the kernel saw JAX_PLATFORMS and XLA_FLAGS
    assert f"loaded {folder}" in text
    assert re.search(rf"{BATCH} images at 16x16, 2 steps: [\d.]+ s, [\d.]+ images/s", text), text
    assert f"saved an sdjax export to {export}" in text
    assert (export / "sdjax.json").is_file()
    pngs = [o for c in code for o in _outputs(c, "display_data") if "image/png" in o["data"]]
    assert len(pngs) == 3, "txt2img, the timed batch, and img2img each show one image strip"


@pytest.mark.slow
def test_console_scripts_run_outside_the_checkout(venv, tmp_path):
    wheel, env_dir = venv
    bin_dir = env_dir / "bin"
    r = _run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", wheel])
    assert r.returncode == 0, r.stderr
    folder = tiny_models.save_pipeline(tmp_path / "sd1", "sd1", seed=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    r = _run([bin_dir / "python", "-c", "import sys, sdjax; sdjax.StableDiffusion; "
              "print(sorted(m for m in ('tensorflow_datasets', 'grain', 'torch') if m in sys.modules))"],
             cwd=elsewhere, env=_env())
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr  # inference needs none of them

    r = _run([bin_dir / "sdjax-txt2img", "--checkpoint", folder, "--prompt", "a red circle", "--steps", "2",
              "--n-samples", "2", "--seed", "5", "--out", "out"], cwd=elsewhere, env=_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PyTorch was not found" not in r.stdout + r.stderr  # transformers' advice, silenced
    written = sorted((elsewhere / "out").glob("0*.png"))
    assert len(written) == 2 and (elsewhere / "out" / "grid-0000.png").is_file()
    from sdjax import StableDiffusion  # the checkout's, in this process: the same images
    want = StableDiffusion.from_pretrained(folder).txt2img(["a red circle"] * 2, steps=2, seed=5)
    got = np.stack([np.asarray(Image.open(p)) for p in written])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1

    r = _run([bin_dir / "sdjax-txt2img", "--checkpoint", folder / "unet", "--prompt", "x"], cwd=elsewhere, env=_env())
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    r = _run([bin_dir / "sdjax-train", "latent", "--config", "tiny", "--workdir", "w"], cwd=elsewhere, env=_env())
    assert r.returncode != 0 and "pip install 'sdjax[train]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
