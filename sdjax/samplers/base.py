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


Advance = Callable[[Any, ModelFn, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
"""advance(plan, model_fn, x, i, key_i, memory) -> (x, memory): plan step i, the model called inside.
``key_i`` is ``fold_in(key, i)``; ``memory`` is what the sampler carries between steps (DPM-Solver's
previous x0 prediction)."""


def _unit_sigma(plan: Any) -> float:
    return 1.0


def _no_memory(x: jax.Array) -> tuple:
    return ()


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler: a plan, one pure step, and the one driver every sampler shares (``sample``).

    make_plan(config, num_steps, *, eta=0.0) -> plan: static per-step tables (a pytree: pass it to `jax.jit` as an
        argument so its arrays, eta included, are traced and changing them does not recompile).
    advance: one plan step (see ``Advance``).
    noise_to(x0, noise, plan, start_index) -> x at the noise level of plan step `start_index`.
    init_sigma(plan): the scale of txt2img's starting noise; memory(x): the first step's memory.
    """

    name: str
    make_plan: Callable[..., Any]
    advance: Advance
    noise_to: Callable[..., jax.Array]
    init_sigma: Callable[[Any], Any] = _unit_sigma
    memory: Callable[[jax.Array], Any] = _no_memory

    def sample(self, model_fn: ModelFn, noise: jax.Array, key: jax.Array, plan: Any, *, start_index: int = 0,
               stop_index: int | None = None, x0: jax.Array | None = None, add_noise: bool = True,
               after_step: AfterStep | None = None, unroll: bool = False) -> jax.Array:
        """Runs plan steps start_index .. stop_index - 1 (default: to the last) in one scan and returns the last x.

        `noise` is standard normal: scaled by init_sigma (txt2img), or, when `x0` is given (img2img),
        the start is noise_to(x0, noise, plan, start_index); with ``add_noise=False`` the start is `x0`
        itself (latents an earlier call stopped at ``stop_index``: diffusers' ``denoising_start``).
        Step i draws its randomness from fold_in(key, i). `after_step(x, i)`, if given, rewrites x
        after each step i (inpainting). `unroll`: the steps written out instead of one loop (XLA's cost
        analysis counts a loop's body once).
        """
        num_steps = plan.timesteps.shape[0]
        stop_index = num_steps if stop_index is None else stop_index
        if not isinstance(start_index, (int, np.integer)) or not 0 <= start_index < num_steps:
            raise ValueError(f"start_index must be a Python int in [0, {num_steps}), got {start_index!r}.")
        if not isinstance(stop_index, (int, np.integer)) or not start_index < stop_index <= num_steps:
            raise ValueError(f"stop_index must be a Python int in ({start_index}, {num_steps}], got {stop_index!r}.")
        if x0 is None:
            if start_index != 0 or not add_noise:
                raise ValueError("start_index > 0 or add_noise=False needs x0 (the latent to start from); pass x0=.")
            x = noise.astype(jnp.float32) * self.init_sigma(plan)
        else:
            x = self.noise_to(x0, noise, plan, start_index) if add_noise else x0.astype(jnp.float32)

        def body(carry, i):
            x, memory = self.advance(plan, model_fn, carry[0], i, jax.random.fold_in(key, i), carry[1])
            return (x if after_step is None else after_step(x, i), memory), None

        (x, _), _ = jax.lax.scan(body, (x, self.memory(x)), jnp.arange(start_index, stop_index), unroll=unroll)
        return x


def img2img_start(num_steps: int, strength: float) -> int:
    """The first plan step to run for img2img, as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}.")
    init_timestep = min(int(num_steps * strength), num_steps)
    start = max(num_steps - init_timestep, 0)
    if start >= num_steps:
        raise ValueError(f"strength={strength} with num_steps={num_steps} leaves no denoising step; raise either.")
    return start


def denoising_span(timesteps: np.ndarray, num_train_timesteps: int, start_index: int,
                   denoising_start: float | None, denoising_end: float | None) -> tuple[int, int]:
    """(first, stop) plan steps for diffusers' ``denoising_start`` / ``denoising_end`` (SDXL's base and
    refiner as an ensemble of experts): ``denoising_end`` keeps the steps whose timestep is at least
    round(T - end * T), as diffusers' SDXL pipelines do, and ``denoising_start`` runs the steps below
    round(T - start * T), replacing ``start_index`` (img2img's strength)."""
    t = np.asarray(timesteps, np.float64)
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not (isinstance(value, (float, np.floating)) and 0.0 < value < 1.0):
            raise ValueError(f"{name} must be a float in (0, 1) (the fraction of the noise schedule), got {value!r}.")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}.")
    cutoff = lambda fraction: int(round(num_train_timesteps - fraction * num_train_timesteps))  # noqa: E731
    if denoising_start is not None:
        start_index = len(t) - int((t < cutoff(denoising_start)).sum())
    stop = len(t) if denoising_end is None else start_index + int((t[start_index:] >= cutoff(denoising_end)).sum())
    if start_index >= len(t) or stop <= start_index:
        raise ValueError(f"denoising_start={denoising_start}, denoising_end={denoising_end} with {len(t)} steps "
                         "leave no step to run; give more steps or move them apart.")
    return start_index, stop


def check_steps(config: SchedulerConfig, num_steps: int) -> None:
    if not 1 <= num_steps <= config.num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {config.num_train_timesteps}], got {num_steps}.")


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


def vp_noise_to(x0: jax.Array, noise: jax.Array, plan: Any, start_index: int) -> jax.Array:
    """x0 noised to plan step `start_index`'s alpha_bar (diffusers' add_noise): shared by DDIM and DPM-Solver."""
    a = plan.alpha_bar[start_index]
    return jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * noise.astype(jnp.float32)
