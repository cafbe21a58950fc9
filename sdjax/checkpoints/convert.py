"""Map PyTorch-layout state dicts (diffusers / transformers names) onto sdjax parameters.

sdjax modules mirror the PyTorch module names, with list indices joined by an
underscore, so one rule serves every network:

    down_blocks.0.resnets.1.conv1.weight  ->  down_blocks_0/resnets_1/conv1/kernel

``weight`` becomes ``kernel`` (transposed to Flax layout), ``scale`` (norms) or
``embedding``, whichever the target module owns; ``bias`` stays. A 1x1 conv and a
linear layer are interchangeable (SD 1 stores some projections as convs).
``flax_to_torch`` is the inverse, used by the exports.
"""

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

from sdjax.checkpoints.errors import CheckpointError, describe_mismatch
from sdjax.models.configs import abstract_module_params, text_encoder_inputs
from sdjax.models.text_encoder import CLIPTextEncoder, TextEncoderConfig


def flax_path(torch_key: str) -> tuple[str, ...]:
    parts: list[str] = []
    for p in torch_key.split("."):
        if p.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    return tuple(parts)


# Torch module names that end in _<digit> themselves (time_embedding.linear_1), not list indices.
_TORCH_NAMES_WITH_DIGITS = frozenset({"linear_1", "linear_2"})


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of a Flax parameter path (the inverse of ``flax_path``)."""
    parts: list[str] = []
    for name in path[:-1]:
        m = re.fullmatch(r"(.+)_(\d+)", name)
        parts.extend(m.groups() if m and name not in _TORCH_NAMES_WITH_DIGITS else (name,))
    leaf = path[-1]
    parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    return ".".join(parts)


def flax_to_torch(params: Mapping[str, Any], dtype: Any = None) -> dict[str, np.ndarray]:
    """A PyTorch-layout state dict (numpy, contiguous) of a Flax params tree; ``dtype`` casts every tensor."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        arr = np.asarray(value)
        if path[-1] == "kernel":
            arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T  # (kh, kw, I, O) -> (O, I, kh, kw)
        out[torch_key(path)] = np.ascontiguousarray(arr if dtype is None else arr.astype(dtype))
    return out


def _to_flax_layout(arr: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if arr.ndim == 4:  # (O, I, kh, kw) -> (kh, kw, I, O)
            arr = arr.transpose(2, 3, 1, 0)
        elif arr.ndim == 2:  # (O, I) -> (I, O)
            arr = arr.T
        if arr.shape != target_shape and arr.size == int(np.prod(target_shape)):
            # linear <-> 1x1 conv
            if len(target_shape) == 4 and arr.ndim == 2:
                arr = arr.reshape(target_shape)
            elif len(target_shape) == 2 and arr.ndim == 4 and arr.shape[:2] == (1, 1):
                arr = arr.reshape(target_shape)
    return arr


def torch_to_flax(state_dict: Mapping[str, Any], target: Mapping[str, Any], *, what: str,
                  ignore: Iterable[str] = ()) -> dict:
    """Build a params tree shaped like ``target`` (arrays or ShapeDtypeStructs) from ``state_dict``.

    Raises CheckpointError listing every missing key, unexpected key and shape mismatch.
    """
    flat_target = traverse_util.flatten_dict(dict(target))
    modules: dict[tuple[str, ...], set[str]] = {}
    for path in flat_target:
        modules.setdefault(path[:-1], set()).add(path[-1])
    ignore = tuple(ignore)

    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    mismatched_paths = set()
    for key, value in state_dict.items():
        if any(key.endswith(s) for s in ignore):
            continue
        path = flax_path(key)
        owner, leaf = path[:-1], path[-1]
        names = modules.get(owner)
        if names is None:
            unexpected.append(key)
            continue
        if leaf == "weight":
            leaf = next((n for n in ("kernel", "scale", "embedding") if n in names), "weight")
        if leaf not in names:
            unexpected.append(key)
            continue
        full = owner + (leaf,)
        want = tuple(flat_target[full].shape)
        arr = _to_flax_layout(np.asarray(value), leaf, want)
        if arr.shape != want:
            mismatched.append(f"{key}: checkpoint {tuple(np.shape(value))}, model {want}")
            mismatched_paths.add(full)
            continue
        out[full] = arr
    missing = ["/".join(p) for p in flat_target if p not in out and p not in mismatched_paths]
    if unexpected or mismatched or missing:
        raise CheckpointError(describe_mismatch(what, missing, unexpected, mismatched))
    return traverse_util.unflatten_dict(out)


def text_encoder_from_torch(state_dict: Mapping[str, Any], config: TextEncoderConfig) -> dict:
    """Flax params of ``CLIPTextEncoder`` from a ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``)
    state dict (with or without the ``text_model.`` prefix). For a penultimate-layer config, the layers
    past the ones used are dropped."""
    prefix = "text_model."
    sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    unused = tuple(f"encoder.layers.{i}." for i in range(config.num_layers_used, config.num_hidden_layers))
    sd = {k: v for k, v in sd.items() if not k.startswith(unused)}
    target = abstract_module_params(CLIPTextEncoder(config), text_encoder_inputs(config))
    return torch_to_flax(sd, target, what="text_encoder", ignore=("position_ids",))


def text_encoder_to_torch(params: Mapping[str, Any], dtype: Any = None) -> dict[str, np.ndarray]:
    """A ``CLIPTextModel`` state dict (``text_model.*``, the layout every transformers version reads);
    ``CLIPTextModelWithProjection``'s ``text_projection`` sits beside ``text_model``."""
    return {k if k.startswith("text_projection.") else f"text_model.{k}": v
            for k, v in flax_to_torch(params, dtype).items()}
