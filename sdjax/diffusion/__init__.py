"""The diffusion (forward noising) process: schedules, noising and training targets."""

from sdjax.diffusion.schedule import (
    SchedulerConfig,
    add_noise,
    alphas_cumprod,
    alphas_cumprod_f64,
    betas,
    get_target,
    rescale_zero_terminal_snr,
    to_x0_eps,
    to_x0_eps_at,
    velocity,
)

__all__ = [
    "SchedulerConfig",
    "add_noise",
    "alphas_cumprod",
    "alphas_cumprod_f64",
    "betas",
    "get_target",
    "rescale_zero_terminal_snr",
    "to_x0_eps",
    "to_x0_eps_at",
    "velocity",
]
