"""sdjax's own inference format: an Orbax checkpoint of the parameters plus JSON configs.

Layout of a saved directory::

    sdjax.json      format marker and the configs of every component
    params/         Orbax checkpoint: {"unet": ..., "vae": ..., "text_encoder": ...}
    tokenizer/      the CLIP tokenizer files (when the model has one)
"""

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from sdjax.checkpoints.convert import CheckpointError, describe_mismatch

MARKER = "sdjax.json"
FORMAT_VERSION = 1


def is_sdjax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def single_process_checkpointer() -> ocp.StandardCheckpointer:
    """An Orbax checkpointer that writes from the calling process alone. Exports are written by
    one host; the default checkpointer would wait at barriers for every process of the run."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def save(path: str, configs: dict[str, Any], params: dict[str, Any], tokenizer_dir: str | None = None) -> None:
    """Write configs and params to ``path`` (created; an existing sdjax export there is replaced)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path) and not is_sdjax_dir(path):
        raise FileExistsError(f"{path} exists and is not an sdjax export; choose an empty or new directory.")
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ckptr = single_process_checkpointer()
    ckptr.save(os.path.join(tmp, "params"), jax.tree_util.tree_map(np.asarray, params))
    ckptr.wait_until_finished()
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"format": "sdjax", "version": FORMAT_VERSION, "configs": configs}, f, indent=2, sort_keys=True)
    # Swap in only once everything is written, so a crash never leaves a half export at ``path``.
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def read_configs(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, MARKER)) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/{MARKER} is corrupt ({e}); export the model again.") from e
    if meta.get("format") != "sdjax" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}/{MARKER}: unsupported format {meta.get('format')!r} "
                              f"version {meta.get('version')!r}; this sdjax reads version {FORMAT_VERSION}.")
    return meta["configs"]


def load_params(path: str, expected: dict[str, Any]) -> dict[str, Any]:
    """Restore params and check them against ``expected`` (a tree of ShapeDtypeStructs)."""
    params_dir = os.path.join(os.path.abspath(path), "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path}: no params/ folder; the export is incomplete. Export the model again.")
    try:
        restored = ocp.StandardCheckpointer().restore(params_dir)
    except Exception as e:  # Orbax raises various types for damaged checkpoints
        raise CheckpointError(f"{params_dir}: could not restore the Orbax checkpoint ({type(e).__name__}: {e}). "
                              "It is corrupt or incomplete; export the model again.") from e
    flat_got = traverse_util.flatten_dict(restored, sep="/")
    flat_want = traverse_util.flatten_dict(expected, sep="/")
    missing = [k for k in flat_want if k not in flat_got]
    unexpected = [k for k in flat_got if k not in flat_want]
    mismatched = [f"{k}: checkpoint {tuple(flat_got[k].shape)}, model {tuple(v.shape)}"
                  for k, v in flat_want.items() if k in flat_got and tuple(flat_got[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise CheckpointError(describe_mismatch(f"{path} (sdjax export)", missing, unexpected, mismatched))
    return restored
