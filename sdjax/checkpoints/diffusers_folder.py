"""Reading a diffusers pipeline folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/)."""

import glob
import json
import os
from typing import Any

import numpy as np

from sdjax.checkpoints.convert import CheckpointError
from sdjax.checkpoints.tensors import read_tensors

MODEL_INDEX = "model_index.json"
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def is_diffusers_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_INDEX))


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing; the checkpoint folder is incomplete.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from e


def _weight_files(folder: str, variant: str | None, allow_pickle: bool) -> list[str]:
    suffixes = [".safetensors"] + ([".bin"] if allow_pickle else [])
    infix = f".{variant}" if variant else ""
    for suffix in suffixes:
        for stem in _WEIGHT_STEMS:
            single = os.path.join(folder, f"{stem}{infix}{suffix}")
            if os.path.isfile(single):
                return [single]
            index = single + ".index.json"
            if os.path.isfile(index):
                shards = sorted(set(read_json(index)["weight_map"].values()))
                return [os.path.join(folder, s) for s in shards]
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")))
    pickles = [f for f in found if f.endswith(".bin")]
    hint = (" The folder holds PyTorch pickles only: pass allow_pickle=True (loads them with "
            "torch.load(weights_only=True)) or convert them to safetensors." if pickles and not allow_pickle else "")
    raise CheckpointError(f"{folder}: no weights file found (looked for "
                          f"{'/'.join(_WEIGHT_STEMS)}{infix}{'|'.join(suffixes)}; found {found}).{hint}")


def read_component(path: str, name: str, *, variant: str | None = None,
                   allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config.json and the state dict (torch names, numpy values) of one component."""
    folder = os.path.join(path, name)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path}: no {name}/ folder; a Stable Diffusion diffusers folder needs "
                              "unet/, vae/, text_encoder/, tokenizer/ and scheduler/.")
    config = read_json(os.path.join(folder, "config.json"))
    state: dict[str, np.ndarray] = {}
    for f in _weight_files(folder, variant, allow_pickle):
        state.update(read_tensors(f, allow_pickle=allow_pickle))
    return config, state


def read_scheduler_config(path: str) -> dict[str, Any] | None:
    f = os.path.join(path, "scheduler", "scheduler_config.json")
    return read_json(f) if os.path.isfile(f) else None
