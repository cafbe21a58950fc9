"""What every sampler shares: the interface, timestep spacings, the img2img start index."""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion.schedule import SchedulerConfig, alphas_cumprod_f64

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
"""model_fn(x_in [B, ...], t_B [B] float32) -> model output [B, ...] (classifier-free guidance folded in)."""

AfterStep = Callable[[jax.Array, jax.Array], jax.Array]
"""after_step(x, i) -> x: applied to the sampler's x after plan step i (inpainting's blend of the known region)."""


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler as three pure functions.

    make_plan(config, num_steps, *, eta=0.0) -> plan: static per-step tables (a pytree: pass it to `jax.jit` as an
        argument so its arrays, eta included, are traced and changing them does not recompile).
    sample(model_fn, noise, key, plan, *, start_index=0, x0=None, after_step=None) -> x0 estimate: `noise` is standard
        normal; the sampler scales it itself, or, when `x0` is given (img2img), starts from
        noise_to(x0, noise, plan, start_index). `after_step(x, i)`, if given, rewrites x after each step i.
    noise_to(x0, noise, plan, start_index) -> x at the noise level of plan step `start_index`.
    """

    name: str
    make_plan: Callable[..., Any]
    sample: Callable[..., jax.Array]
    noise_to: Callable[..., jax.Array]


def img2img_start(num_steps: int, strength: float) -> int:
    """The first plan step to run for img2img, as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}.")
    init_timestep = min(int(num_steps * strength), num_steps)
    start = max(num_steps - init_timestep, 0)
    if start >= num_steps:
        raise ValueError(f"strength={strength} with num_steps={num_steps} leaves no denoising step; raise either.")
    return start


def check_steps(config: SchedulerConfig, num_steps: int) -> None:
    if not 1 <= num_steps <= config.num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {config.num_train_timesteps}], got {num_steps}.")


def check_start(plan_steps: int, start_index: int) -> None:
    if not isinstance(start_index, (int, np.integer)) or not 0 <= start_index < plan_steps:
        raise ValueError(f"start_index must be a Python int in [0, {plan_steps}), got {start_index!r}.")


def check_no_eta(name: str, eta: float) -> None:
    if eta != 0.0:
        raise ValueError(f"eta={eta} is a DDIM option; the {name} sampler takes no eta (use eta=0.0 or 'ddim').")


def spaced_timesteps(config: SchedulerConfig, num_steps: int, *, round_linspace: bool) -> np.ndarray:
    """Descending timesteps as diffusers' DDIM/Euler `set_timesteps` for the config's timestep_spacing (float64)."""
    t_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, t_train - 1, num_steps)
        if round_linspace:
            ts = ts.round()
        return ts[::-1].copy()
    if config.timestep_spacing == "leading":
        ratio = t_train // num_steps
        return (np.arange(num_steps) * ratio)[::-1].astype(np.float64) + config.steps_offset
    ratio = t_train / num_steps  # trailing
    return np.round(np.arange(t_train, 0, -ratio)) - 1.0


def ve_sigmas(config: SchedulerConfig) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) per training timestep, float64.

    With a zero-terminal-SNR schedule the last alpha_bar is set to 2**-24, as diffusers does, so sigma stays finite.
    """
    ac = alphas_cumprod_f64(config)
    if config.rescale_betas_zero_snr:
        ac[-1] = 2.0**-24
    return np.sqrt((1.0 - ac) / ac)


def interp_sigmas(config: SchedulerConfig, timesteps: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps, linearly interpolated in t."""
    table = ve_sigmas(config)
    return np.interp(timesteps, np.arange(len(table)), table)


def batch_t(t: jax.Array, x: jax.Array) -> jax.Array:
    """A scalar timestep repeated for each example of x: [B] float32."""
    return jnp.full((x.shape[0],), t, jnp.float32)


def apply_after_step(after_step: AfterStep | None, x: jax.Array, i: jax.Array) -> jax.Array:
    return x if after_step is None else after_step(x, i)


def start_noise(noise: jax.Array, x0: jax.Array | None, plan: Any, start_index: int, noise_to, init_sigma) -> jax.Array:
    """The sampler's first x: scaled noise (txt2img) or x0 noised to step `start_index` (img2img)."""
    if x0 is None:
        if start_index != 0:
            raise ValueError("start_index > 0 needs x0 (the clean latent to noise); pass x0= for img2img.")
        return noise.astype(jnp.float32) * init_sigma
    return noise_to(x0, noise, plan, start_index)


def vp_noise_to(x0: jax.Array, noise: jax.Array, plan: Any, start_index: int) -> jax.Array:
    """x0 noised to plan step `start_index`'s alpha_bar (diffusers' add_noise): shared by DDIM and DPM-Solver."""
    a = plan.alpha_bar[start_index]
    return jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * noise.astype(jnp.float32)
