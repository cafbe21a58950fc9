"""DPM-Solver++(2M) (Lu et al. 2022), matching diffusers' DPMSolverMultistepScheduler defaults.

algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
final_sigmas_type="zero": the first step taken and the last step are first order (DDIM-like), the rest reuse the
previous x0 prediction. The update coefficients depend only on the schedule, so the plan precomputes them in float64:
    x_{i+1} = a_i x_i + b_i D_i + c_i (D_i - D_{i-1}),   D = predicted x0
with a = sigma_{i+1}/sigma_i (VP sigmas), b = alpha_{i+1} (1 - e^{-h_i}), c = b h_i / (2 h_{i-1}), h = lambda step.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion.schedule import SchedulerConfig, to_x0_eps
from sdjax.samplers.base import ModelFn, batch_t, check_no_eta, check_steps, interp_sigmas, vp_noise_to


@flax.struct.dataclass
class DPMSolverPlan:
    timesteps: jax.Array  # [N] float32, descending
    alpha_bar: jax.Array  # [N] alpha_bar of each step's noise level
    a: jax.Array  # [N] coefficient of x
    b: jax.Array  # [N] coefficient of the x0 prediction
    c: jax.Array  # [N] coefficient of the x0-prediction difference (0 on the final, first-order step)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")


def timesteps_for(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps: spacings over num_steps + 1 points, last one dropped."""
    t_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, t_train - 1, num_steps + 1).round()[::-1][:-1].copy()
    if config.timestep_spacing == "leading":
        ratio = t_train // (num_steps + 1)
        return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.float64) + config.steps_offset
    return np.arange(t_train, 0, -t_train / num_steps).round() - 1.0  # trailing


def make_plan(config: SchedulerConfig, num_steps: int, *, eta: float = 0.0) -> DPMSolverPlan:
    check_no_eta("dpm++2m", eta)
    check_steps(config, num_steps)
    timesteps = timesteps_for(config, num_steps)
    s = np.append(interp_sigmas(config, timesteps).astype(np.float32), 0.0).astype(np.float64)  # VE, [N + 1]
    alpha = 1.0 / np.sqrt(1.0 + s**2)
    sigma = s * alpha
    a = sigma[1:] / sigma[:-1]
    b = alpha[1:] * (1.0 - s[1:] / s[:-1])  # e^{-h} = s_{i+1} / s_i
    h = np.log(s[:-2] / s[1:-1])  # [N - 1]; the last step (to s = 0) has h = inf and is first order
    c = np.zeros(num_steps)
    # A repeated sigma (h_{i-1} = 0, only at hundreds of steps) leaves no slope to extrapolate: stay first order there.
    np.divide(0.5 * b[1:-1] * h[1:], h[:-1], out=c[1:-1], where=h[:-1] > 0)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return DPMSolverPlan(
        timesteps=f32(timesteps),
        alpha_bar=f32(alpha[:-1] ** 2),
        a=f32(a),
        b=f32(b),
        c=f32(c),
        prediction_type=config.prediction_type,
    )


def step(
    plan: DPMSolverPlan,
    model_output: jax.Array,
    x: jax.Array,
    i: jax.Array,
    prev_x0: jax.Array,
    second_order: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One multistep update from plan step i: returns (next x, this step's x0 prediction, to pass on as prev_x0)."""
    x0, _ = to_x0_eps(model_output, x, plan.alpha_bar[i], plan.prediction_type)
    c = jnp.where(second_order, plan.c[i], 0.0)
    return plan.a[i] * x + plan.b[i] * x0 + c * (x0 - prev_x0), x0


noise_to = vp_noise_to


def initial_memory(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Before the first step taken: no previous x0 prediction (that step is first order)."""
    return jnp.zeros_like(x), jnp.asarray(False)


def advance(plan: DPMSolverPlan, model_fn: ModelFn, x: jax.Array, i: jax.Array, key: jax.Array,
            memory: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Plan step i, second order when a previous x0 prediction is in ``memory`` (deterministic: no key)."""
    prev_x0, second_order = memory
    x, x0 = step(plan, model_fn(x, batch_t(plan.timesteps[i], x)), x, i, prev_x0, second_order)
    return x, (x0, jnp.asarray(True))
