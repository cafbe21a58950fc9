"""What both trainers build alike: the mesh, the train state's shardings and the jitted step.

A trainer supplies its pure step ``step(state, batch, frozen) -> (state, metrics)`` and its
``init(key, *args) -> TrainState`` (parameters still in Flax's logical boxes; a trainer that starts
networks from given parameters also takes ``start=``, those parameters by network, used instead of
drawing them); ``compile_step``
derives the shardings from ``jax.eval_shape(init)`` and jits the step once, with explicit in/out
shardings, the state donated, and the model's activation constraints resolved on the mesh.
"""

import concurrent.futures
import dataclasses
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax import sharding
from sdjax.train_state import RUN_ONCE_COMPILER_OPTIONS, TrainState, abstract_sharded, sharded_init, trace_init
from sdjax.training.schema import MeshConfig


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """A run's devices and jitted step: the mesh and its rules, the train state's shardings (which
    also carry the optimizer), the batch's, and ``step(state, global batch, frozen)``."""
    mesh: Mesh
    rules: tuple
    init: Callable[..., TrainState]  # init(key, *init_args) -> boxed TrainState (a replay of its trace)
    init_from_start: Callable[..., TrainState]  # the trainer's init(key, *init_args, start=...) itself
    seed: int
    shardings: TrainState
    target: TrainState  # the state's ShapeDtypeStructs with their shardings
    batch_sharding: NamedSharding
    batch_keys: tuple[str, ...]
    step: Callable[[TrainState, dict, Any], tuple[TrainState, dict]]

    def restore_target(self) -> TrainState:
        """Abstract arrays carrying shardings: what a checkpoint restores into (and what the step is
        compiled for before the first state exists)."""
        return self.target

    def fresh_state(self, *init_args: Any, start: dict[str, Any] | None = None) -> TrainState:
        """``init(key(seed), *init_args)``, written straight into the shardings. ``start``: trained
        networks' starting parameters (in the state's shardings), used instead of drawing them."""
        if start is None:
            return sharded_init(self.init, self.shardings)(jax.random.key(self.seed), *init_args)
        init = lambda key, start, *args: self.init_from_start(key, *args, start=start)  # noqa: E731
        return sharded_init(init, self.shardings)(jax.random.key(self.seed), start, *init_args)

    def device_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A host batch (this process's rows) -> the global batch the step takes."""
        return sharding.global_batch({k: host_batch[k] for k in self.batch_keys}, self.batch_sharding)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def ahead_of_time(self, frozen: Any) -> "CompiledSteps":
        """``step(state, batch)`` with ``frozen`` bound, compiled before its first run (see ``CompiledSteps``)."""
        return CompiledSteps(self.step, frozen)


class CompiledSteps:
    """The jitted step compiled ahead of time, once per batch shape, and called with ``frozen`` bound.

    After each compilation every process waits for the others at a barrier (``sharding.barrier``),
    so a new program's first collective never starts while a peer is still compiling it (on CPU a
    collective gives a late process 30 s). ``compile`` and ``compile_all`` take abstract arguments
    (``ShapeDtypeStruct`` with shardings), so a run can compile all its shapes before its first step.
    """

    def __init__(self, jitted: Callable, frozen: Any):
        self.jitted, self.frozen, self.programs = jitted, frozen, {}

    @staticmethod
    def _key(batch: dict) -> tuple:
        return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))

    def compile(self, state: Any, batch: dict) -> None:
        self.compile_all(state, [batch])

    def compile_all(self, state: Any, batches: Sequence[dict], max_workers: int = 4) -> None:
        """Compiles the step for each batch shape not compiled yet: traced one by one, then compiled
        by up to ``max_workers`` threads at once (XLA compiles outside Python's lock: a host with
        cores to spare compiles several buckets' programs in the time of one), then one barrier."""
        todo = {}
        for batch in batches:
            key = self._key(batch)
            if key not in self.programs and key not in todo:
                todo[key] = self.jitted.lower(state, batch, self.frozen)
        if not todo:
            return
        workers = min(len(todo), max_workers, os.cpu_count() or 1)
        if workers > 1:
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
                compiled = list(pool.map(lambda lowered: lowered.compile(), todo.values()))
        else:
            compiled = [lowered.compile() for lowered in todo.values()]
        self.programs.update(zip(todo, compiled))
        sharding.barrier("train step compiled")

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = self._key(batch)
        if key not in self.programs:
            self.compile(state, batch)
        return self.programs[key](state, batch, self.frozen)


def make_mesh(config: MeshConfig, batch_size: int, devices: Sequence[jax.Device] | None = None,
              micro_batches: int = 1) -> tuple[Mesh, tuple]:
    """The mesh and the logical-axis rules that apply to it; raises unless the batch (each of
    ``micro_batches``) splits evenly over data parallelism and hosts."""
    mesh = sharding.make_mesh(config.shape, config.axes, devices)
    rules = sharding.filter_rules(config.rules, mesh)
    sharding.check_batch_size(batch_size, mesh, rules, micro_batches)
    return mesh, rules


def compile_step(step: Callable, *, mesh: Mesh, rules: tuple, init: Callable[..., TrainState], init_args: tuple,
                 seed: int, batch_keys: tuple[str, ...], frozen_shardings: Any, fast_compile: bool,
                 learning_rate: optax.Schedule | None = None) -> TrainProgram:
    """``step`` jitted for the mesh; with ``learning_rate`` the metrics also report the step's rate.
    ``init_args``: init's arguments after the key, as used for shapes (e.g. a latent scale)."""
    # init traced once, for the shapes both the shardings and the restore target are made of, and
    # replayed for a fresh state (a trace of a full-size model's init takes seconds).
    replay, abstract = trace_init(init, jax.random.key(seed), *init_args)
    shardings = sharding.tree_shardings(abstract, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)

    def step_on_mesh(state: TrainState, batch: dict, frozen: Any) -> tuple[TrainState, dict]:
        # Activation constraints (nn.with_logical_constraint in the models) resolve through these two.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            new_state, metrics = step(state, batch, frozen)
        if learning_rate is not None:
            metrics = dict(metrics, learning_rate=learning_rate(state.step))
        return new_state, metrics

    jitted = jax.jit(step_on_mesh, in_shardings=(shardings, {k: batch_sharding for k in batch_keys}, frozen_shardings),
                     out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,),
                     compiler_options=RUN_ONCE_COMPILER_OPTIONS if fast_compile else None)
    return TrainProgram(mesh=mesh, rules=rules, init=replay, init_from_start=init, seed=seed, shardings=shardings,
                        target=abstract_sharded(abstract, shardings),
                        batch_sharding=batch_sharding, batch_keys=batch_keys, step=jitted)
