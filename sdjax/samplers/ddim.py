"""DDIM (Song et al. 2021), matching diffusers' DDIMScheduler, with real eta noise.

Like diffusers, the step from timestep t goes to t - num_train_timesteps // num_steps whatever the spacing, and the
last step lands on alpha_bar = 1 (set_alpha_to_one) or alpha_bar_0.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion.schedule import SchedulerConfig, alphas_cumprod_f64, to_x0_eps
from sdjax.samplers.base import ModelFn, batch_t, check_steps, spaced_timesteps, vp_noise_to


@flax.struct.dataclass
class DDIMPlan:
    timesteps: jax.Array  # [N] float32, descending
    alpha_bar: jax.Array  # [N] alpha_bar at each step's timestep
    alpha_bar_prev: jax.Array  # [N] alpha_bar at the step's target
    variance: jax.Array  # [N] sigma_t^2 / eta^2 of DDIM eq. 16
    eta: jax.Array  # scalar: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    clip_sample: bool = flax.struct.field(pytree_node=False, default=False)


def make_plan(config: SchedulerConfig, num_steps: int, *, eta: float = 0.0) -> DDIMPlan:
    check_steps(config, num_steps)
    ac = alphas_cumprod_f64(config)
    timesteps = spaced_timesteps(config, num_steps, round_linspace=True).astype(np.int64)
    prev = timesteps - config.num_train_timesteps // num_steps
    final = 1.0 if config.set_alpha_to_one else ac[0]
    a = ac[timesteps]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    variance = (1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return DDIMPlan(
        timesteps=f32(timesteps),
        alpha_bar=f32(a),
        alpha_bar_prev=f32(a_prev),
        variance=f32(variance),
        eta=f32(eta),
        prediction_type=config.prediction_type,
        clip_sample=config.clip_sample,
    )


def step(
    plan: DDIMPlan, model_output: jax.Array, x: jax.Array, i: jax.Array, noise: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update from plan step i: returns (x at the previous timestep, predicted x0)."""
    a, a_prev = plan.alpha_bar[i], plan.alpha_bar_prev[i]
    x0, eps = to_x0_eps(model_output, x, a, plan.prediction_type)
    if plan.clip_sample:
        x0 = jnp.clip(x0, -1.0, 1.0)
    std = plan.eta * jnp.sqrt(plan.variance[i])
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std**2) * eps + std * noise.astype(jnp.float32)
    return x_prev, x0


noise_to = vp_noise_to


def advance(plan: DDIMPlan, model_fn: ModelFn, x: jax.Array, i: jax.Array, key: jax.Array, memory: tuple
            ) -> tuple[jax.Array, tuple]:
    """Plan step i with the model's output at x; the eta noise is normal(key)."""
    out = model_fn(x, batch_t(plan.timesteps[i], x))
    return step(plan, out, x, i, jax.random.normal(key, x.shape, jnp.float32))[0], memory
