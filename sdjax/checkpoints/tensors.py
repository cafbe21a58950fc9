"""Reading tensor files without torch: safetensors (default) and, on explicit opt-in, PyTorch pickles."""

import json
import mmap
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from sdjax.checkpoints.convert import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (bf16 via ml_dtypes).

    Validates the header and every tensor's byte range, so a truncated or corrupt file
    raises CheckpointError instead of returning garbage.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); the file is truncated or empty.")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len <= 0 or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (declares {header_len} header bytes in a {size}-byte file). "
                "Download the file again; if it is a PyTorch pickle renamed to .safetensors, load it with allow_pickle=True.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}). Download the file again.") from e
        data_start = 8 + header_len
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object).")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else b""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}: {info!r}") from e
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes. "
                "Download or copy the file again.")
        count = int(np.prod(shape)) if shape else 1
        if (end - begin) != count * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{path}: corrupt safetensors entry {name!r}: byte range does not match {shape} {info['dtype']}.")
        out[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
    return out


def read_torch_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """A PyTorch pickle (.ckpt/.bin), only with explicit opt-in, loaded with weights_only=True."""
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a PyTorch pickle. Pickles can run code when loaded, so sdjax reads them only with an "
            "explicit opt-in: pass allow_pickle=True (command line: --allow-pickle), which loads it with "
            "torch.load(weights_only=True). Better, convert it once to safetensors: "
            "python -c \"import torch, safetensors.torch as s; sd=torch.load('IN', weights_only=True); "
            "sd=sd.get('state_dict', sd); s.save_file({k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}, 'OUT.safetensors')\"")
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
