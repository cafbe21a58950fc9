"""Euler and Euler-ancestral samplers in the sigma (VE) parametrisation (Karras et al. 2022).

Match diffusers' EulerDiscreteScheduler (interpolation_type="linear", no churn) and
EulerAncestralDiscreteScheduler. Plain Euler is the ancestral step with sigma_up = 0 and sigma_down = sigma_next.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion.schedule import SchedulerConfig, to_x0_eps
from sdjax.samplers.base import ModelFn, batch_t, check_no_eta, check_steps, interp_sigmas, spaced_timesteps


@flax.struct.dataclass
class EulerPlan:
    timesteps: jax.Array  # [N] float32, descending (fractional for "linspace" spacing)
    sigmas: jax.Array  # [N] VE sigma of each step
    sigma_down: jax.Array  # [N] deterministic target sigma of each step
    sigma_up: jax.Array  # [N] std of the fresh noise added by each step (0 for plain Euler)
    init_sigma: jax.Array  # scalar: std of the initial noise
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    ancestral: bool = flax.struct.field(pytree_node=False, default=False)


def make_plan(config: SchedulerConfig, num_steps: int, *, eta: float = 0.0, ancestral: bool = False) -> EulerPlan:
    check_no_eta("euler_a" if ancestral else "euler", eta)
    check_steps(config, num_steps)
    timesteps = spaced_timesteps(config, num_steps, round_linspace=False).astype(np.float32)
    s = np.append(interp_sigmas(config, timesteps.astype(np.float64)).astype(np.float32), 0.0).astype(np.float64)
    s_from, s_to = s[:-1], s[1:]
    if ancestral:
        sigma_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        sigma_down = np.sqrt(s_to**2 - sigma_up**2)
    else:
        sigma_up, sigma_down = np.zeros_like(s_to), s_to
    s_max = np.float64(s.max())
    init_sigma = s_max if config.timestep_spacing in ("linspace", "trailing") else np.sqrt(s_max**2 + 1.0)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return EulerPlan(
        timesteps=f32(timesteps),
        sigmas=f32(s_from),
        sigma_down=f32(sigma_down),
        sigma_up=f32(sigma_up),
        init_sigma=f32(init_sigma),
        prediction_type=config.prediction_type,
        ancestral=ancestral,
    )


def model_input(plan: EulerPlan, x: jax.Array, i: jax.Array) -> jax.Array:
    """x / sqrt(sigma^2 + 1): the VP-scaled sample the network was trained on."""
    return x * jax.lax.rsqrt(plan.sigmas[i] ** 2 + 1.0)


def step(
    plan: EulerPlan, model_output: jax.Array, x: jax.Array, i: jax.Array, noise: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One Euler (ancestral) update from plan step i: returns (next x, predicted x0)."""
    sigma = plan.sigmas[i]
    x0, _ = to_x0_eps(model_output, model_input(plan, x, i), 1.0 / (1.0 + sigma**2), plan.prediction_type)
    x_next = x + (x - x0) / sigma * (plan.sigma_down[i] - sigma)
    if plan.ancestral:
        x_next = x_next + plan.sigma_up[i] * noise.astype(jnp.float32)
    return x_next, x0


def noise_to(x0: jax.Array, noise: jax.Array, plan: EulerPlan, start_index: int) -> jax.Array:
    """x0 + sigma * noise at plan step `start_index` (diffusers' Euler add_noise after set_begin_index)."""
    return x0.astype(jnp.float32) + plan.sigmas[start_index] * noise.astype(jnp.float32)


def init_sigma(plan: EulerPlan) -> jax.Array:
    return plan.init_sigma


def advance(plan: EulerPlan, model_fn: ModelFn, x: jax.Array, i: jax.Array, key: jax.Array, memory: tuple
            ) -> tuple[jax.Array, tuple]:
    """Plan step i; the ancestral noise is normal(key)."""
    out = model_fn(model_input(plan, x, i), batch_t(plan.timesteps[i], x))
    z = jax.random.normal(key, x.shape, jnp.float32) if plan.ancestral else None
    return step(plan, out, x, i, z)[0], memory
