"""The forward (noising) process of a discrete-time variance-preserving diffusion model.

Tables are built in float64 NumPy and handed out as float32, so that every consumer (training loss,
samplers) sees the same rounded schedule; the per-example math runs in float32 on jnp arrays.
"""

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

BetaSchedule = Literal["scaled_linear", "linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]

_CHOICES = {
    "beta_schedule": ("scaled_linear", "linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers `scheduler_config.json` that define the process; defaults are SD 1.x's."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        for field, choices in _CHOICES.items():
            value = getattr(self, field)
            if value not in choices:
                raise ValueError(f"SchedulerConfig.{field}={value!r} is not supported; use one of {list(choices)}.")
        if self.num_train_timesteps < 1:
            raise ValueError(f"SchedulerConfig.num_train_timesteps must be >= 1, got {self.num_train_timesteps}.")

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> "SchedulerConfig":
        """Reads a diffusers scheduler config dict; unknown keys (e.g. `_class_name`, `skip_prk_steps`) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_diffusers_config(self) -> dict[str, Any]:
        """The same fields as a dict that `diffusers.<Scheduler>.from_config` accepts."""
        return dataclasses.asdict(self)


def _betas_f64(config: SchedulerConfig) -> np.ndarray:
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    else:  # squaredcos_cap_v2: the Glide/improved-DDPM cosine schedule, betas capped at 0.999.
        alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alphas_cumprod) so the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def alphas_cumprod_f64(config: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), in float64 for building static sampler plans."""
    return np.cumprod(1.0 - _betas_f64(config))


def betas(config: SchedulerConfig) -> jax.Array:
    """beta_t for t = 0 .. num_train_timesteps-1, float32."""
    return jnp.asarray(_betas_f64(config), jnp.float32)


def alphas_cumprod(config: SchedulerConfig) -> jax.Array:
    """alpha_bar_t for t = 0 .. num_train_timesteps-1, float32."""
    return jnp.asarray(alphas_cumprod_f64(config), jnp.float32)


def _per_example(v_B: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example [B] (or scalar) coefficient to broadcast against x [B, ...]."""
    v_B = jnp.asarray(v_B, jnp.float32)
    return v_B.reshape(v_B.shape + (1,) * (x.ndim - v_B.ndim))


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t_B: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, with integer timesteps t_B of shape [B]."""
    a = _per_example(alphas_cumprod[t_B], x0)
    return jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * noise.astype(jnp.float32)


def velocity(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t_B: jax.Array) -> jax.Array:
    """v_t = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022)."""
    a = _per_example(alphas_cumprod[t_B], x0)
    return jnp.sqrt(a) * noise.astype(jnp.float32) - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)


def get_target(
    alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t_B: jax.Array, prediction_type: PredictionType
) -> jax.Array:
    """What a model of the given prediction type is trained to output for x_t = add_noise(x0, noise, t)."""
    if prediction_type == "epsilon":
        return noise.astype(jnp.float32)
    if prediction_type == "v_prediction":
        return velocity(alphas_cumprod, x0, noise, t_B)
    if prediction_type == "sample":
        return x0.astype(jnp.float32)
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; use one of {_CHOICES['prediction_type']}.")


def to_x0_eps(
    model_output: jax.Array, x_t: jax.Array, alpha_bar: jax.Array, prediction_type: PredictionType
) -> tuple[jax.Array, jax.Array]:
    """Converts a model output at noise level alpha_bar (scalar or [B]) into (predicted x0, predicted noise)."""
    a = _per_example(alpha_bar, x_t)
    out, x_t = model_output.astype(jnp.float32), x_t.astype(jnp.float32)
    sqrt_a, sqrt_1ma = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    if prediction_type == "epsilon":
        return (x_t - sqrt_1ma * out) / sqrt_a, out
    if prediction_type == "v_prediction":
        return sqrt_a * x_t - sqrt_1ma * out, sqrt_a * out + sqrt_1ma * x_t
    if prediction_type == "sample":
        return out, (x_t - sqrt_a * out) / sqrt_1ma
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; use one of {_CHOICES['prediction_type']}.")


def to_x0_eps_at(
    alphas_cumprod: jax.Array, model_output: jax.Array, x_t: jax.Array, t_B: jax.Array, prediction_type: PredictionType
) -> tuple[jax.Array, jax.Array]:
    """`to_x0_eps` at integer timesteps t_B [B] (the training-side view)."""
    return to_x0_eps(model_output, x_t, alphas_cumprod[t_B], prediction_type)
