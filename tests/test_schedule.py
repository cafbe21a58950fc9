"""The diffusion process against diffusers' PyTorch schedulers (float32) and closed-form identities."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from sdjax.diffusion import schedule
from sdjax.diffusion.schedule import SchedulerConfig

SD_SCHEDULER_JSON = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

CONFIGS = {
    "scaled_linear": SchedulerConfig(),
    "linear": SchedulerConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "cosine": SchedulerConfig(beta_schedule="squaredcos_cap_v2"),
    "scaled_linear_zero_snr": SchedulerConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
}


def test_config_from_sd_json_ignores_unknown_keys_and_round_trips():
    config = SchedulerConfig.from_diffusers_config(SD_SCHEDULER_JSON)
    assert config == SchedulerConfig()
    assert SchedulerConfig.from_diffusers_config(config.to_diffusers_config()) == config
    reference = DDIMScheduler.from_config(config.to_diffusers_config()).config
    for field in dataclasses.fields(SchedulerConfig):
        assert reference[field.name] == getattr(config, field.name), field.name


@pytest.mark.parametrize(
    "field,value", [("beta_schedule", "cosine"), ("prediction_type", "x0"), ("timestep_spacing", "karras")]
)
def test_config_rejects_unknown_values(field, value):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig.from_diffusers_config({field: value})


def diffusers_float64(config: SchedulerConfig) -> DDIMScheduler:
    """diffusers' scheduler with its betas accumulated (and zero-SNR rescaled) in float64.

    diffusers builds alphas_cumprod in float32, where the cumprod and the rescale's ratios of cumprods drift by up to
    ~4e-7 absolute (2e-4 relative in rescaled betas); sqrt(1 - alpha_bar) near t = 0 amplifies that to ~5e-6.
    """
    ref = DDIMScheduler.from_config({**config.to_diffusers_config(), "rescale_betas_zero_snr": False})
    betas = ref.betas.double()
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    ref.betas = betas
    ref.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_betas_and_alphas_cumprod_match_diffusers(name):
    config = CONFIGS[name]
    ref32 = DDIMScheduler.from_config(config.to_diffusers_config())
    ref64 = diffusers_float64(config)
    betas, ac = schedule.betas(config), schedule.alphas_cumprod(config)
    assert betas.dtype == ac.dtype == jnp.float32
    np.testing.assert_allclose(ac, ref32.alphas_cumprod.numpy(), atol=1e-6)
    np.testing.assert_allclose(betas, ref64.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ac, ref64.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-12)
    if config.rescale_betas_zero_snr:
        assert float(ac[-1]) == 0.0
    else:
        np.testing.assert_allclose(betas, ref32.betas.numpy(), rtol=2e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_add_noise_and_velocity_match_diffusers(name):
    config = CONFIGS[name]
    ref = diffusers_float64(config)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 5, 4, 4, 3), dtype=np.float32)
    t = np.array([0, 1, 500, 998, 999])
    ac = schedule.alphas_cumprod(config)
    ref_args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    np.testing.assert_allclose(schedule.add_noise(ac, x0, noise, t), ref.add_noise(*ref_args).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        schedule.get_target(ac, x0, noise, t, "v_prediction"), ref.get_velocity(*ref_args).numpy(), atol=1e-6
    )
    np.testing.assert_array_equal(schedule.get_target(ac, x0, noise, t, "epsilon"), noise)
    np.testing.assert_array_equal(schedule.get_target(ac, x0, noise, t, "sample"), x0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_to_x0_eps_inverts_the_training_target(prediction_type):
    config = SchedulerConfig()
    ac = schedule.alphas_cumprod(config)
    x0, noise = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 2))
    t = jnp.array([10, 300, 900])
    x_t = schedule.add_noise(ac, x0, noise, t)
    target = schedule.get_target(ac, x0, noise, t, prediction_type)
    x0_hat, eps_hat = schedule.to_x0_eps_at(ac, target, x_t, t, prediction_type)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, noise, atol=2e-4)
