"""Training checkpoints: one Orbax CheckpointManager per workdir.

A checkpoint step holds two items saved together: ``state`` (a TrainState's arrays) and
``data`` (each host's grain iterator position). Saves are asynchronous; Orbax writes into
a temporary directory and renames it only once every host has finished, so a run killed
at any moment (even mid-save) resumes from the last complete step.
"""

import os
from typing import Any

import orbax.checkpoint as ocp

from sdjax.checkpoints.convert import CheckpointError
from sdjax.data import iterator_restore_args, iterator_save_args
from sdjax.train_state import TrainState

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
