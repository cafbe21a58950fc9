"""sdjax's own formats: an Orbax checkpoint of the parameters plus JSON configs.

A whole model (``save`` / ``read_configs`` + ``load_params``)::

    sdjax.json      format marker and the configs of every component
    params/         Orbax checkpoint: {"unet": ..., "vae": ..., "text_encoder": ...}
    tokenizer/      the CLIP tokenizer files (when the model has one)
    tokenizer_2/    SDXL's second tokenizer

An autoencoder alone (``save_vae`` / ``read_vae``), what phase 1 hands to phase 2::

    vae.json        {"format": "sdjax-vae", "version": 1, "config": <diffusers AutoencoderKL config>}
    params/         Orbax checkpoint of the AutoencoderKL params

Both are written into a temporary folder and swapped in whole, so a crash never leaves a
half-written export at the destination.
"""

import contextlib
import json
import os
import shutil
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from sdjax.checkpoints import atomic
from sdjax.checkpoints.errors import CheckpointError, describe_mismatch
from sdjax.models.autoencoder import AutoencoderConfig

MARKER = "sdjax.json"
FORMAT_VERSION = 1
VAE_MARKER = "vae.json"
VAE_FORMAT_VERSION = 1


def is_sdjax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def is_vae_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, VAE_MARKER))


def single_process_checkpointer() -> ocp.StandardCheckpointer:
    """An Orbax checkpointer that writes from the calling process alone. Exports are written by
    one host; the default checkpointer would wait at barriers for every process of the run."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


@contextlib.contextmanager
def _atomic_export(path: str, marker: str, meta: dict[str, Any], params: Any) -> Iterator[str]:
    """Writes ``params/`` and ``marker`` into a temporary folder, lets the caller add files to it,
    then replaces ``path`` (an earlier export of the same kind, or nothing) with it."""
    is_same_kind = lambda p: os.path.isfile(os.path.join(p, marker))  # noqa: E731
    with atomic.folder(path, is_same_kind, f"an sdjax export ({marker})") as tmp:
        ckptr = single_process_checkpointer()
        ckptr.save(os.path.join(tmp, "params"), jax.tree_util.tree_map(np.asarray, params))
        ckptr.wait_until_finished()
        yield tmp
        with open(os.path.join(tmp, marker), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)


def _read_marker(path: str, marker: str, fmt: str, version: int) -> dict[str, Any]:
    try:
        with open(os.path.join(path, marker)) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/{marker} is corrupt ({e}); export the model again.") from e
    if meta.get("format") != fmt or meta.get("version") != version:
        raise CheckpointError(f"{path}/{marker}: unsupported format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}; this sdjax reads {fmt} version {version}.")
    return meta


def _restore_params(path: str) -> Any:
    params_dir = os.path.join(os.path.abspath(path), "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path}: no params/ folder; the export is incomplete. Export the model again.")
    try:
        return ocp.StandardCheckpointer().restore(params_dir)
    except Exception as e:  # Orbax raises various types for damaged checkpoints
        raise CheckpointError(f"{params_dir}: could not restore the Orbax checkpoint ({type(e).__name__}: {e}). "
                              "It is corrupt or incomplete; export the model again.") from e


def save(path: str, configs: dict[str, Any], params: dict[str, Any], tokenizer_dir: str | None = None,
         tokenizer_2_dir: str | None = None) -> None:
    """Write configs and params to ``path`` (created; an existing sdjax export there is replaced)."""
    meta = {"format": "sdjax", "version": FORMAT_VERSION, "configs": configs}
    with _atomic_export(path, MARKER, meta, params) as tmp:
        for name, folder in (("tokenizer", tokenizer_dir), ("tokenizer_2", tokenizer_2_dir)):
            if folder is not None:
                shutil.copytree(folder, os.path.join(tmp, name))


def read_configs(path: str) -> dict[str, Any]:
    return _read_marker(path, MARKER, "sdjax", FORMAT_VERSION)["configs"]


def load_params(path: str, expected: dict[str, Any]) -> dict[str, Any]:
    """Restore params and check them against ``expected`` (a tree of ShapeDtypeStructs)."""
    restored = _restore_params(path)
    flat_got = traverse_util.flatten_dict(restored, sep="/")
    flat_want = traverse_util.flatten_dict(expected, sep="/")
    missing = [k for k in flat_want if k not in flat_got]
    unexpected = [k for k in flat_got if k not in flat_want]
    mismatched = [f"{k}: checkpoint {tuple(flat_got[k].shape)}, model {tuple(v.shape)}"
                  for k, v in flat_want.items() if k in flat_got and tuple(flat_got[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise CheckpointError(describe_mismatch(f"{path} (sdjax export)", missing, unexpected, mismatched))
    return restored


def save_vae(path: str, config: AutoencoderConfig, params: Any) -> None:
    """Writes an autoencoder export (see the module docstring); replaces an earlier one at ``path``."""
    meta = {"format": "sdjax-vae", "version": VAE_FORMAT_VERSION, "config": config.to_diffusers_config()}
    with _atomic_export(path, VAE_MARKER, meta, params):
        pass


def read_vae(path: str) -> tuple[AutoencoderConfig, Any]:
    """(config, params) of an autoencoder export."""
    meta = _read_marker(path, VAE_MARKER, "sdjax-vae", VAE_FORMAT_VERSION)
    return AutoencoderConfig.from_diffusers_config(meta["config"]), _restore_params(path)
