"""Samplers: a static plan per (SchedulerConfig, num_steps) and one pure step each; ``Sampler.sample``
(``base.py``) is the one scan driver they share."""

import functools

from sdjax.samplers import ddim, dpm_solver, euler
from sdjax.samplers.base import Sampler, denoising_span, img2img_start

SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler("ddim", ddim.make_plan, ddim.advance, ddim.noise_to),
    "dpm++2m": Sampler("dpm++2m", dpm_solver.make_plan, dpm_solver.advance, dpm_solver.noise_to,
                       memory=dpm_solver.initial_memory),
    "euler": Sampler("euler", functools.partial(euler.make_plan, ancestral=False), euler.advance, euler.noise_to,
                     init_sigma=euler.init_sigma),
    "euler_a": Sampler("euler_a", functools.partial(euler.make_plan, ancestral=True), euler.advance, euler.noise_to,
                       init_sigma=euler.init_sigma),
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; valid names: {sorted(SAMPLERS)}.")
    return SAMPLERS[name]


__all__ = ["SAMPLERS", "Sampler", "denoising_span", "get_sampler", "img2img_start"]
