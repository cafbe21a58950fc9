"""Training checkpoints (one Orbax CheckpointManager per workdir) and the frozen-VAE contract.

A checkpoint step holds two items saved together: ``state`` (a TrainState's arrays) and
``data`` (each host's grain iterator position). Saves are asynchronous; Orbax writes into
a temporary directory and renames it only once every host has finished, so a run killed
at any moment (even mid-save) resumes from the last complete step.

Frozen autoencoder for phase 2 (written by the autoencoder trainer, read by the latent
trainer)::

    DIR/vae.json   {"format": "sdjax-vae", "version": 1, "config": <diffusers AutoencoderKL config dict>}
    DIR/params/    Orbax StandardCheckpointer tree of the AutoencoderKL params (unboxed)

``export_vae(DIR, config, params)`` writes it; ``load_frozen_vae(path)`` reads it, and also
takes the VAE out of anything ``StableDiffusion.from_pretrained`` loads (an sdjax export,
a diffusers folder, a single-file checkpoint). ``config.scaling_factor`` is the latent
scale the VAE trainer measured (or SD's 0.18215).
"""

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdjax.checkpoints.convert import CheckpointError
from sdjax.checkpoints.sdjax_format import single_process_checkpointer
from sdjax.data import iterator_restore_args, iterator_save_args
from sdjax.models.autoencoder import AutoencoderConfig
from sdjax.train_state import TrainState

VAE_MARKER = "vae.json"
VAE_FORMAT_VERSION = 1
_STATE_FIELDS = ("step", "params", "ema_params", "opt_state", "rng", "extra")


def make_manager(workdir: str, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """The run's checkpoint manager over ``workdir/checkpoints``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def _state_items(state: TrainState) -> dict[str, Any]:
    return {f: getattr(state, f) for f in _STATE_FIELDS}


def save(manager: ocp.CheckpointManager, state: TrainState, data_iterator=None, force: bool = False) -> bool:
    """Starts an async save of ``state`` (and the data position) at ``state.step``."""
    args = {"state": ocp.args.StandardSave(_state_items(state))}
    if data_iterator is not None:
        args["data"] = iterator_save_args(data_iterator)
    return manager.save(int(state.step), args=ocp.args.Composite(**args), force=force)


def restore_latest(manager: ocp.CheckpointManager, target: TrainState, data_iterator=None) -> TrainState | None:
    """Restores the newest complete step into ``target`` (abstract arrays carrying shardings; its
    ``tx`` is kept) and moves ``data_iterator`` to the saved position. None if there is no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    args = {"state": ocp.args.StandardRestore(_state_items(target))}
    if data_iterator is not None:
        args["data"] = iterator_restore_args(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{manager.directory}/{step}: cannot restore into this run's train state ({e}). "
                              "Was it written with a different model or optimizer config? Use a new workdir.") from e
    return target.replace(**restored["state"])


def export_vae(path: str, config: AutoencoderConfig, params: Any) -> None:
    """Writes a frozen VAE for phase 2 (see the module docstring); replaces an earlier export at ``path``."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, VAE_MARKER)):
        raise FileExistsError(f"{path} exists and is not a VAE export; choose an empty or new directory.")
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ckptr = single_process_checkpointer()
    ckptr.save(os.path.join(tmp, "params"), jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
    with open(os.path.join(tmp, VAE_MARKER), "w") as f:
        json.dump({"format": "sdjax-vae", "version": VAE_FORMAT_VERSION, "config": config.to_diffusers_config()},
                  f, indent=2, sort_keys=True)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_frozen_vae(path: str) -> tuple[AutoencoderConfig, Any]:
    """(config, params) of the autoencoder in ``path``: a VAE export or any full SD checkpoint."""
    from sdjax.stable_diffusion import StableDiffusion  # Heavy and only needed for full checkpoints.

    path = os.fspath(path)
    marker = os.path.join(path, VAE_MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            meta = json.load(f)
        if meta.get("format") != "sdjax-vae" or meta.get("version") != VAE_FORMAT_VERSION:
            raise CheckpointError(f"{marker}: unsupported format {meta.get('format')!r} version "
                                  f"{meta.get('version')!r}; expected sdjax-vae version {VAE_FORMAT_VERSION}.")
        config = AutoencoderConfig.from_diffusers_config(meta["config"])
        params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"))
        return config, params
    if not os.path.exists(path):
        raise FileNotFoundError(f"autoencoder.path={path}: no such file or directory. Give a VAE export "
                                f"({VAE_MARKER} + params/) or a Stable Diffusion checkpoint.")
    sd = StableDiffusion.from_pretrained(path)
    return sd.configs.vae, sd.params["vae"]
