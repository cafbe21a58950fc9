"""Reading tensor files without torch: safetensors (default) and, on explicit opt-in, PyTorch pickles."""

from typing import Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from sdjax.checkpoints.errors import CheckpointError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (bf16 via ml_dtypes), read by the
    ``safetensors`` library, which validates the header and every tensor's byte range: a
    truncated or corrupt file raises CheckpointError instead of returning garbage."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({e}). The file is truncated or corrupt: download or copy it "
            "again; if it is a PyTorch pickle renamed to .safetensors, load it with allow_pickle=True.") from e


def read_torch_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """A PyTorch pickle (.ckpt/.bin), only with explicit opt-in, loaded with weights_only=True."""
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a PyTorch pickle. Pickles can run code when loaded, so sdjax reads them only with an "
            "explicit opt-in: pass allow_pickle=True (command line: --allow-pickle), which loads it with "
            "torch.load(weights_only=True). Better, convert it once to safetensors: "
            "python -c \"import torch, safetensors.torch as s; sd=torch.load('IN', weights_only=True); "
            "sd=sd.get('state_dict', sd); s.save_file({k: v.contiguous() for k, v in sd.items() "
            "if hasattr(v, 'contiguous')}, 'OUT.safetensors')\"")
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a PyTorch pickle and torch is not installed. Install torch (pip install torch) to read it "
            "with allow_pickle=True, or convert it to .safetensors on a machine that has torch.") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad or unsafe pickles
        raise CheckpointError(f"{path}: could not load the PyTorch pickle with weights_only=True: {e}") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}.")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            out[k] = v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
    return out


def read_tensors(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    if path.endswith(SAFETENSORS_SUFFIX):
        return read_safetensors(path)
    if path.endswith(PICKLE_SUFFIXES):
        return read_torch_pickle(path, allow_pickle)
    raise CheckpointError(f"{path}: unknown weights file type; supported: .safetensors, and PyTorch pickles "
                          f"({', '.join(PICKLE_SUFFIXES)}) with allow_pickle=True.")
