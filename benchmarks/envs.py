"""The peers' virtual environments, created by the harness on first use (pinned, CPU torch wheel).

``diffusers-flax``: diffusers 0.39.0, the last release with Flax pipelines, on the same jax/flax as
sdjax (0.39's Flax code runs on jax 0.10.2 / flax 0.12.8), with transformers 4.57.6 (the last
line with FlaxCLIPTextModel). Same XLA on both sides, so differences are the code's.
``diffusers-torch``: current diffusers with PyTorch.
``maxdiffusion``: what MaxDiffusion's SDXL inference imports (its source is not on the registry:
clone it and put its ``src/`` on PYTHONPATH; measured at commit 7cfb880, whose pyproject asks for
Python >= 3.12 while the code runs on 3.11), on the same jax/flax/libtpu as sdjax.
"""

import os
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"  # pinned first, so nothing pulls a CUDA build
SPECS = {
    "diffusers-flax": ["diffusers==0.39.0", "transformers==4.57.6", "jax==0.10.2", "flax==0.12.8", "safetensors"],
    "diffusers-torch": ["diffusers", "transformers", "safetensors", "accelerate"],
    "maxdiffusion": ["transformers==4.57.6", "huggingface-hub==0.36.2", "jax==0.10.2", "flax==0.12.8",
                     "diffusers==0.39.0", "safetensors", "tensorflow-cpu==2.21.0", "tensorboardX==2.6.5",
                     "google-cloud-storage==3.17.1", "pyyaml", "pillow", "optax", "orbax-checkpoint==0.12.8",
                     "ftfy", "einops", "chex", "aqtp==0.9.0", "datasets==3.6.0", "grain==0.2.18", "etils"],
}
GPU_EXTRAS = {"diffusers-flax": ["jax[cuda12]==0.10.2"]}
# libtpu: compiling for TPU slices ahead of time
TPU_EXTRAS = {"diffusers-flax": ["jax[tpu]==0.10.2"], "maxdiffusion": ["jax[tpu]==0.10.2"]}


def python(envs_dir: str | Path, name: str, gpu: bool = False, tpu: bool = False) -> str:
    """The interpreter of environment ``name``, creating and filling it first if needed."""
    if name not in SPECS:
        raise ValueError(f"unknown peer environment {name!r}; known: {sorted(SPECS)}.")
    env = Path(envs_dir) / name
    exe = env / "bin" / "python"
    requirements = ([TORCH] + SPECS[name] + (GPU_EXTRAS.get(name, []) if gpu else [])
                    + (TPU_EXTRAS.get(name, []) if tpu else []))
    stamp = env / ".bench-requirements"
    if exe.exists() and stamp.is_file() and stamp.read_text() == "\n".join(requirements):
        return str(exe)
    print(f"[bench] creating {env} ({' '.join(requirements)})", file=sys.stderr, flush=True)
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [TORCH], check=True)
    subprocess.run(pip + requirements[1:], check=True)
    stamp.write_text("\n".join(requirements))
    return str(exe)


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
