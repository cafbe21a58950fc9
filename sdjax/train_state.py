"""The train state shared by every sdjax trainer: params, EMA, optimizer, step, RNG, extras.

Build it inside one function ``init(key, ...) -> TrainState`` whose params are still Flax
``Partitioned`` boxes; ``trace_init`` traces it once, for the shapes the shardings are derived
from, and ``sharded_init`` runs that trace, jitted, straight into those shardings (nothing is ever
materialised unsharded). ``rng`` is a raw uint32 key (``jax.random.key_data``) so checkpoints stay plain
arrays; a step draws its randomness from ``fold_in(state.key, state.step)``.
"""

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.extend
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # trained parameters (f32 master weights)
    ema_params: Any  # exponential moving average of params, same structure and shardings; None: no EMA
    opt_state: Any
    rng: jax.Array  # uint32 raw root key
    extra: dict[str, jax.Array]  # small non-trained state that must survive a resume (e.g. latent scale)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, key: jax.Array,
               extra: dict[str, jax.Array] | None = None, ema: bool = True) -> "TrainState":
        """A fresh state; ``params`` may be boxed (then so are EMA and optimizer moments)."""
        ema_params = jax.tree.map(jnp.copy, params) if ema else None
        return cls(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params, opt_state=tx.init(params),
                   rng=jax.random.key_data(key), extra=dict(extra or {}), tx=tx)

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)

    def step_key(self) -> jax.Array:
        """This step's key: the same for a given step whatever happened before (resume-exact)."""
        return jax.random.fold_in(self.key, self.step)

    def apply_gradients(self, grads: Any, ema_max_decay: float | None = None) -> "TrainState":
        """One optimizer update, then the EMA update (if the state keeps one) with the step count after it."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        ema = self.ema_params
        if ema is not None:
            ema = update_ema(ema, params, ema_decay(self.step, ema_max_decay))
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
    """The original LDM/diffusers warm-up: min(max_decay, (1 + step) / (10 + step))."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


def update_ema(ema: Any, params: Any, decay: jax.Array) -> Any:
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def make_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int, schedule: str = "constant",
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
                   clip_norm: float | None = 1.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up then a constant or cosine-decayed rate, after global-norm clipping
    (``clip_norm`` None or 0: none)."""
    if schedule == "constant":
        lr = optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        lr = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1))
    else:
        raise ValueError(f"train.schedule={schedule!r} is not supported; use 'constant' or 'cosine'.")
    if warmup_steps:  # 0: the full rate from the first step on
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), lr], [warmup_steps])
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts), lr


def trace_init(init: Callable[..., TrainState], *args: Any) -> tuple[Callable[..., TrainState], TrainState]:
    """``init`` traced once at ``args``' shapes: a function that replays the trace (for arguments of
    those shapes) and the shapes (and logical boxes) of its result, nothing allocated. Replaying the
    trace skips a second trace of the networks' initialisers, which costs as much as the first."""
    jaxpr, abstract = jax.make_jaxpr(init, return_shape=True)(*args)
    run, tree = jax.extend.core.jaxpr_as_fun(jaxpr), jax.tree.structure(abstract)
    return (lambda *a: jax.tree.unflatten(tree, run(*jax.tree.leaves(a)))), abstract


# Code that runs once (initialisers) is not worth XLA's backend optimisation: on CPU it cuts
# the compile time of even a tiny UNet's init from about a minute to seconds.
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def sharded_init(init: Callable[..., TrainState], shardings: TrainState) -> Callable[..., TrainState]:
    """``init`` jitted to write every array straight into its sharding (boxes removed)."""
    return jax.jit(lambda *a: nn.meta.unbox(init(*a)), out_shardings=shardings,
                   compiler_options=RUN_ONCE_COMPILER_OPTIONS)


def abstract_sharded(abstract: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying shardings (the boxed ``abstract_state`` unboxed): the restore
    target of a checkpoint."""
    shapes = nn.meta.unbox(abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
