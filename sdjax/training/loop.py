"""The one training loop both phases run: resume, step, log, periodic hooks, checkpoint, export.

A phase supplies a ``Task``: its jitted step, how to start (a fresh state, or the abstract
state a checkpoint restores into), its data, and what to do every few steps (held-out
evaluation, sample grids). ``run`` resumes from the workdir's latest checkpoint (train state
and data position together), so re-running the same command continues an interrupted run.
"""

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax

from sdjax import data, metrics, paths
from sdjax.checkpoints import train as train_ckpt
from sdjax.train_state import TrainState
from sdjax.training import preemption
from sdjax.training.schema import LoopConfig


@dataclasses.dataclass(frozen=True)
class Hook:
    """``run(step, state, writer)`` every ``every`` steps and after the last one (never if 0); a hook
    that returns True ends the run there (checkpoint and export as after the last step)."""
    every: int
    run: Callable[[int, TrainState, metrics.MetricsWriter], bool | None]


@dataclasses.dataclass(frozen=True)
class Task:
    """What a phase hands to ``run``."""
    train: LoopConfig
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]  # (state, global batch)
    restore_target: TrainState  # abstract arrays carrying shardings
    init_state: Callable[[Any], TrainState]  # the first global batch -> a fresh state
    iterator: Iterator  # this host's batches, checkpointable (grain)
    device_batch: Callable[[Any], Any]  # a host batch -> the global batch the step takes
    hooks: tuple[Hook, ...] = ()
    export: Callable[[TrainState], None] | None = None  # after the last step


def run(task: Task, workdir: str) -> TrainState:
    """Trains until ``task.train.steps`` (resuming from ``workdir``'s latest checkpoint if any),
    then exports. Metrics go to ``workdir`` (process 0 writes). A SIGTERM on any host saves a step
    every host agrees on and raises ``preemption.Preempted`` (re-running the command resumes there)."""
    with preemption.Watch() as watch:
        return _run(task, workdir, watch)


def _run(task: Task, workdir: str, watch: preemption.Watch) -> TrainState:
    tc = task.train
    manager = train_ckpt.make_manager(workdir, tc.max_to_keep, item_handlers={"data": data.iterator_handler()})
    state = train_ckpt.restore_latest(manager, task.restore_target, {"data": data.iterator_restore_args(task.iterator)})
    pending = None
    if state is None:
        pending = task.device_batch(next(task.iterator))
        state = task.init_state(pending)
    writer = metrics.MetricsWriter(workdir, tc.steps, enabled=jax.process_index() == 0)
    step = int(state.step)
    if pending is None and jax.process_index() == 0:
        print(f"resumed from step {step} ({manager.directory})", flush=True)
    t_last, step_last = time.perf_counter(), step
    while step < tc.steps:
        batch = pending if pending is not None else task.device_batch(next(task.iterator))
        pending = None
        state, m = task.step_fn(state, batch)
        step += 1
        last = step == tc.steps
        if step % tc.log_every == 0 or last:
            m = jax.device_get(m)
            now = time.perf_counter()
            steps_per_sec = (step - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            writer.scalars(step, dict(m, steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * tc.batch_size))
            writer.progress(step, float(m["loss"]), steps_per_sec)
        done = False
        for hook in task.hooks:
            if hook.every and (step % hook.every == 0 or last):
                done = hook.run(step, state, writer) is True or done
        preempted = watch.reached(step) and not last and not done
        if step % tc.checkpoint_every == 0 or last or preempted or done:
            train_ckpt.save(manager, state, {"data": data.iterator_save_args(task.iterator)},
                            force=last or preempted or done)
        if done and not last:
            if jax.process_index() == 0:
                print(f"stopping at step {step} of {tc.steps}: a hook ended the run", flush=True)
            break
        if preempted:
            task.iterator.close()
            manager.wait_until_finished()
            manager.close()
            writer.close()
            raise preemption.Preempted(step)
    task.iterator.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if task.export is not None:
        task.export(state)
    return state


def train(build_task: Callable[[Any, str], Task], config: Any, workdir: str) -> TrainState:
    """Creates ``workdir``, builds the phase's task from ``config`` and runs it."""
    workdir = paths.check(workdir, "--workdir")
    paths.makedirs(workdir)
    return run(build_task(config, workdir), workdir)
