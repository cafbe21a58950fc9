"""Training checkpoints: one Orbax CheckpointManager per workdir.

A checkpoint step holds ``state`` (a TrainState's arrays) and the caller's other items, saved
together: the trainers add ``data``, each host's data-iterator position. Saves are asynchronous; Orbax writes into
a temporary directory and renames it only once every host has finished, so a run killed
at any moment (even mid-save) resumes from the last complete step.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdjax import paths
from sdjax.checkpoints.errors import CheckpointError
from sdjax.train_state import TrainState

_STATE_FIELDS = ("step", "params", "ema_params", "opt_state", "rng", "extra")
_MIN_REPLICA_SLICE_BYTES = 256 * 1024


def make_manager(workdir: str, max_to_keep: int = 3, async_save: bool = True,
                 item_handlers: dict[str, Any] | None = None) -> ocp.CheckpointManager:
    """The run's checkpoint manager over ``workdir/checkpoints``; ``item_handlers``: the Orbax handler
    of each item saved beside the state (e.g. the data iterator's position)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    root = workdir if paths.is_remote(workdir) else os.path.abspath(workdir)
    return ocp.CheckpointManager(f"{root}/checkpoints", options=options,
                                item_handlers={"state": _state_handler(), **(item_handlers or {})})


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler with its default type handlers, less each array's saved sharding (the
    ``_sharding`` file) and array metadata: a run restores into its own target's shardings, never the
    saved ones, and a state of many small arrays pays those writes per array. The files read as
    before: a step saved either way restores either way.

    The replicas of an array share its writing (replica-parallel) only where each one's slice holds
    at least ``_MIN_REPLICA_SLICE_BYTES``: cutting a slice per replica costs a dispatch per array and
    shard (and, on the first save, a compile per shape), more than writing a small array whole."""
    types = ocp.type_handlers
    scalars = tuple((t, types.ScalarHandler()) for t in (int, float, bytes, np.number))
    arrays = types.ArrayHandler(enable_write_sharding_file=False,
                                min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES)
    registry = types.create_type_handler_registry(
        *scalars, (np.ndarray, types.NumpyHandler()), (str, types.StringHandler()), (jax.Array, arrays))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _state_items(state: TrainState) -> dict[str, Any]:
    return {f: getattr(state, f) for f in _STATE_FIELDS}


def save(manager: ocp.CheckpointManager, state: TrainState, items: dict[str, Any] | None = None,
         force: bool = False) -> bool:
    """Starts an async save of ``state`` at ``state.step``, with ``items`` (name -> Orbax save args)."""
    args = {"state": ocp.args.PyTreeSave(_state_items(state)), **(items or {})}
    return manager.save(int(state.step), args=ocp.args.Composite(**args), force=force)


def restore_latest(manager: ocp.CheckpointManager, target: TrainState, items: dict[str, Any] | None = None
                   ) -> TrainState | None:
    """Restores the newest complete step into ``target`` (abstract arrays carrying shardings; its
    ``tx`` is kept) and ``items`` (name -> Orbax restore args, e.g. one that moves a data iterator to
    its saved position). None if there is no checkpoint."""
    step = manager.latest_step()
    if step is None:
        return None
    abstract = _state_items(target)
    _check_saved_shapes(manager, step, abstract)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    args = {"state": ocp.args.PyTreeRestore(abstract, restore_args=restore_args), **(items or {})}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise _refused(manager, step, f" ({e})") from e
    return target.replace(**restored["state"])


def _check_saved_shapes(manager: ocp.CheckpointManager, step: int, abstract: dict[str, Any]) -> None:
    """Refuses, before any array is read, a step whose arrays are not the target's: names missing on
    either side or shapes that differ, the first few of each named. Dtypes may differ (a restore
    casts). A step without array metadata is left to the restore's own checks."""
    try:
        saved = manager.item_metadata(step)["state"]
    except (KeyError, ValueError, FileNotFoundError, TypeError):
        return
    leaves = [m for m in jax.tree.leaves(saved) if hasattr(m, "name") and hasattr(m, "shape")]
    if not leaves:
        return
    have = {m.name: tuple(m.shape) for m in leaves}
    want = {jax.tree_util.keystr(path, simple=True, separator="."): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    problems = [f"{n}: saved {have[n]}, this run {want[n]}" for n in want if n in have and have[n] != want[n]]
    problems += [f"{n}: not in the checkpoint" for n in want if n not in have]
    problems += [f"{n}: saved, not in this run's state" for n in have if n not in want]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise _refused(manager, step, f": {len(problems)} array(s) differ ({shown})")


def _refused(manager: ocp.CheckpointManager, step: int, why: str) -> CheckpointError:
    return CheckpointError(f"{manager.directory}/{step}: cannot restore into this run's train state{why}. "
                           "Was it written with a different model or optimizer config? Use a new workdir.")
