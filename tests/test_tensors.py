"""Tensor files: safetensors read through the safetensors library, values and refusals."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdjax.checkpoints.errors import CheckpointError
from sdjax.checkpoints.tensors import read_safetensors, read_tensors


def _write_raw(path, header: dict, data: bytes) -> str:
    """A safetensors file written by hand, so its header can say anything."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def test_values_and_dtypes_match_torch(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=gen), "f16": torch.randn(5, generator=gen).half(),
               "bf16": torch.randn(2, 3, generator=gen).bfloat16(), "i64": torch.arange(6).reshape(2, 3)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path)
    got = read_tensors(path)
    assert sorted(got) == sorted(tensors)
    assert got["bf16"].dtype == ml_dtypes.bfloat16
    for name, t in tensors.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        np.testing.assert_array_equal(np.asarray(got[name], want.dtype), want)


DATA = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes


@pytest.mark.parametrize("header", [
    # Offsets are relative to the end of the header: a negative start points into the header.
    {"a": {"dtype": "F32", "shape": [4], "data_offsets": [-8, 8]}},
    {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
     "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},  # overlapping
    {"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},  # past the end of the file
    {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}},  # length disagrees with the shape
], ids=["negative", "overlapping", "out_of_range", "wrong_length"])
def test_bad_offsets_are_refused(tmp_path, header):
    path = _write_raw(tmp_path / "bad.safetensors", header, DATA)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        read_safetensors(path)


def test_truncated_and_tiny_files_are_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(64)}, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_safetensors(str(truncated))
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_safetensors(str(tiny))
