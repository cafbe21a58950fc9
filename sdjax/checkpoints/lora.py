"""LoRA files: the layouts in circulation, read into ``Adapter``s, and written back.

Layouts read (one ``.safetensors`` file; a folder holding ``pytorch_lora_weights.safetensors``):

    diffusers / PEFT   unet.<module>.lora_A.weight / lora_B.weight, text_encoder.<module>...; alpha and
                       rank from the file's ``lora_adapter_metadata`` (diffusers' save_lora_weights),
                       otherwise alpha = rank
    older diffusers    unet.<module>.lora.down.weight / lora.up.weight, attn processors'
                       ``processor.to_q_lora.down.weight``; optional ``<module>.alpha``
    kohya / A1111      lora_unet_<module with _>.lora_down.weight / lora_up.weight / alpha, lora_te_...;
                       the UNet's modules in diffusers' names or the original (LDM / sgm) ones, SDXL's
                       text encoders as lora_te1_ and lora_te2_

``save`` writes the diffusers/PEFT layout (with diffusers' rank/alpha metadata, what
``load_lora_weights`` reads) or kohya's. Merging adapters into a model's weights: ``sdjax.lora``.
"""

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sdjax import paths
from sdjax.checkpoints import atomic, hub
from sdjax.checkpoints.errors import CheckpointError
from sdjax.checkpoints.formats import LORA_LAYOUTS

NETWORKS = ("unet", "text_encoder", "text_encoder_2")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
# Pairs (down, up) of each layout's key suffixes.
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_down.weight", ".lora_up.weight"))
_OTHER_ARCHITECTURES = (("transformer_blocks.0.ff_context", "SD 3 / Flux"), ("single_transformer_blocks", "Flux"))


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One low-rank update of one layer, in PyTorch layout."""
    network: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str  # the layer's PyTorch module name, e.g. "down_blocks.0.attentions.0.proj_in"
    down: np.ndarray  # (r, in) or (r, in, kh, kw)
    up: np.ndarray  # (out, r) or (out, r, 1, 1)
    alpha: float  # the update is scaled by alpha / r

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _lora_file(path: str) -> str:
    path = hub.resolve(path, "LoRA", default_file=WEIGHT_NAME)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LoRA file. Give a .safetensors file (or a folder holding "
                                f"{WEIGHT_NAME}).")
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: LoRAs are read from .safetensors files only (pickles can run code).")
    return path


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}).") from e


def _peft_alphas(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per network: {"r", "lora_alpha", "rank_pattern", "alpha_pattern"} from diffusers' metadata."""
    if METADATA_KEY not in metadata:
        return {}
    packed = json.loads(metadata[METADATA_KEY])
    out: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        network, _, name = key.partition(".")
        out.setdefault(network, {})[name] = value
    return out


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for pattern, value in (patterns or {}).items():  # PEFT matches a pattern against the module name's end
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default


def _split_network(key: str) -> tuple[str | None, str]:
    for prefix, network in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return network, key  # resolved against the model's module names later
    for network in NETWORKS:
        if key.startswith(network + "."):
            module = key[len(network) + 1:]
            return network, module.removeprefix("text_model.")
    return None, key


def read(path: str) -> list[Adapter]:
    """The adapters in a LoRA file; raises CheckpointError for layouts of other architectures and for
    keys that fit no layout."""
    path = _lora_file(path)
    tensors, metadata = _read(path)
    for marker, arch in _OTHER_ARCHITECTURES:
        if any(marker in k for k in tensors):
            raise CheckpointError(f"{path} is a LoRA for {arch} (keys like *{marker}*), not for Stable Diffusion "
                                  "1.x/2.x/XL; it cannot be applied to this model.")
    peft = _peft_alphas(metadata)
    tensors = {re.sub(r"processor\.(to_[qkv]|to_out)_lora\.", lambda m: m.group(1).replace("to_out", "to_out.0")
                      + ".lora.", k): v for k, v in tensors.items()}
    adapters, used, unknown = [], set(), []
    for key in sorted(tensors):
        pair = next(((d, u) for d, u in _PAIRS if key.endswith(d)), None)
        if pair is None:
            continue
        stem = key[:-len(pair[0])]
        up_key = stem + pair[1]
        network, module = _split_network(stem)
        if network is None or up_key not in tensors:
            unknown.append(key)
            continue
        down, up = tensors[key].astype(np.float32), tensors[up_key].astype(np.float32)
        alpha_key = stem + ".alpha"
        if alpha_key in tensors:
            alpha = float(np.asarray(tensors[alpha_key]).reshape(-1)[0])
            used.add(alpha_key)
        elif network in peft:
            config = peft[network]
            rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", down.shape[0]))
            alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank)))
        else:
            alpha = float(down.shape[0])
        adapters.append(Adapter(network, module, down, up, alpha))
        used.update((key, up_key))
    unknown += [k for k in tensors if k not in used]
    if unknown:
        shown = "\n    ".join(sorted(unknown)[:20])
        raise CheckpointError(f"{path}: {len(unknown)} key(s) fit no LoRA layout sdjax reads (diffusers/PEFT lora_A/"
                              f"lora_B, lora.down/lora.up, kohya lora_down/lora_up/alpha):\n    {shown}")
    if not adapters:
        raise CheckpointError(f"{path} holds no LoRA weights.")
    return adapters

_KOHYA_NETWORK_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_text_model_", "lora_te1_text_model_"),
                           "text_encoder_2": ("lora_te2_text_model_",)}


def kohya_names(network: str, module: str) -> tuple[str, ...]:
    """kohya's names of a layer: ``lora_unet_``, ``lora_te_text_model_`` (SDXL: ``lora_te1_text_model_``,
    ``lora_te2_text_model_``) + the module name with ``_``; ``save`` writes the first (SDXL's first
    encoder: the second)."""
    return tuple(prefix + module.replace(".", "_") for prefix in _KOHYA_NETWORK_PREFIXES[network])


def save(folder: str, adapters: list[Adapter], layout: str = "peft") -> str:
    """Writes ``folder/pytorch_lora_weights.safetensors`` (what ``load_lora_weights(folder)`` reads):
    the diffusers/PEFT layout with diffusers' rank/alpha metadata, or kohya's (``lora_unet_*`` with
    an ``alpha`` per layer). Returns the file's path."""
    if layout not in LORA_LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LORA_LAYOUTS)}.")
    tensors, metadata = {}, {"format": "pt"}
    sdxl = any(a.network == "text_encoder_2" for a in adapters)  # kohya names SDXL's first encoder lora_te1_
    for a in adapters:
        if layout == "peft":  # PEFT names a text encoder's layers inside its text_model
            module = a.module if a.network == "unet" else "text_model." + a.module
            tensors[f"{a.network}.{module}.lora_A.weight"] = a.down
            tensors[f"{a.network}.{module}.lora_B.weight"] = a.up
        else:
            name = kohya_names(a.network, a.module)[1 if sdxl and a.network == "text_encoder" else 0]
            tensors[f"{name}.lora_down.weight"] = a.down
            tensors[f"{name}.lora_up.weight"] = a.up
            tensors[f"{name}.alpha"] = np.asarray(a.alpha, np.float32)
    if layout == "peft":
        packed = {}
        for network in sorted({a.network for a in adapters}):
            mine = [a for a in adapters if a.network == network]
            packed.update({f"{network}.r": mine[0].rank, f"{network}.lora_alpha": mine[0].alpha,
                           f"{network}.target_modules": sorted({a.module for a in mine})})
        metadata[METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    path = os.path.join(paths.check(folder, "LoRA export"), WEIGHT_NAME)
    with atomic.file(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
    return path
