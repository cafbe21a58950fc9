"""Run notebooks/sdjax_colab.ipynb top to bottom on a tiny random checkpoint, so it cannot rot."""

import json
import os
import re
import sys
from pathlib import Path

import nbclient
import nbformat

from tests import tiny_models

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "sdjax_colab.ipynb"
KERNEL = "sdjax-notebook-test"
DEVICES, BATCH = 2, 2


def _kernel_spec(root: Path, env: dict[str, str]) -> Path:
    """A Jupyter kernel running this interpreter with ``env``; returns the folder for JUPYTER_PATH."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps(dict(argv=argv, display_name=KERNEL, language="python", env=env)))
    return root


def _outputs(cell, output_type: str) -> list:
    return [o for o in cell.get("outputs", []) if o["output_type"] == output_type]


def test_notebook_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    folder = tiny_models.save_pipeline(tmp_path / "sd1", "sd1", seed=0)
    export = tmp_path / "export"
    env = {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "SDJAX_NOTEBOOK_CHECKPOINT": str(folder),
        "SDJAX_NOTEBOOK_DTYPE": "float32",
        "SDJAX_NOTEBOOK_SIZE": "16",
        "SDJAX_NOTEBOOK_STEPS": "2",
        "SDJAX_NOTEBOOK_BATCH": str(BATCH),
        "SDJAX_NOTEBOOK_EXPORT_DIR": str(export),
    }
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec(tmp_path / "jupyter", env)))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"  # what Colab starts

    # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
    nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "every code cell ran"
    assert not any(_outputs(c, "error") for c in code)
    text = "".join(o["text"] for c in code for o in _outputs(c, "stream") if o["name"] == "stdout")
    assert f"on cpu: {DEVICES} x cpu" in text  # the kernel saw JAX_PLATFORMS and XLA_FLAGS
    assert f"loaded {folder}" in text
    assert re.search(rf"{BATCH} images at 16x16, 2 steps: [\d.]+ s, [\d.]+ images/s", text), text
    assert f"saved an sdjax export to {export}" in text
    assert (export / "sdjax.json").is_file()
    pngs = [o for c in code for o in _outputs(c, "display_data") if "image/png" in o["data"]]
    assert len(pngs) == 3, "txt2img, the timed batch, and img2img each show one image strip"
