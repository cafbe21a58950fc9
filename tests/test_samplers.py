"""Samplers against diffusers' PyTorch schedulers driven by the same deterministic fake model and the same noise."""

import dataclasses
import types

import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
)

from sdjax.diffusion.schedule import SchedulerConfig
from sdjax.samplers import SAMPLERS, ddim, get_sampler, img2img_start

REFERENCE = {
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}
SD = SchedulerConfig()  # SD 1.x: scaled_linear, epsilon, leading spacing, steps_offset=1
CONFIGS = {
    "sd": SD,
    "v_trailing_zero_snr": dataclasses.replace(
        SD, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True
    ),
    "v_linspace": dataclasses.replace(SD, prediction_type="v_prediction", timestep_spacing="linspace"),
}
SHAPE = (2, 4, 4, 3)
ETA = 0.7


def fake_model(x, t, xp):
    """A smooth nonlinear stand-in for the UNet, written once for jnp and torch; t is [B] (jax) or a scalar (torch)."""
    t = t.reshape(-1, 1, 1, 1) if xp is jnp else t.float()
    return 0.1 * x * xp.cos(t / 300.0) + 0.5 * xp.tanh(x - t / 1000.0) + 0.01 * xp.sin(t)


def step_noise(key, i):
    return jax.random.normal(jax.random.fold_in(key, i), SHAPE, jnp.float32)


def to_torch(x):
    return torch.from_numpy(np.array(x))


def reference(name, config, num_steps):
    ref = REFERENCE[name].from_config(config.to_diffusers_config())
    ref.set_timesteps(num_steps)
    return ref


def run_reference(name, config, num_steps, noise, key, *, start_index=0, x0=None, eta=0.0, monkeypatch=None):
    """The diffusers denoising loop (as in StableDiffusion[Img2Img]Pipeline), fed the noise our sampler draws."""
    ref = reference(name, config, num_steps)
    if x0 is None:
        x = to_torch(noise) * ref.init_noise_sigma
    else:
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(start_index)
        x = ref.add_noise(to_torch(x0), to_torch(noise), ref.timesteps[start_index : start_index + 1])
    if name == "euler_a":
        monkeypatch.setattr(euler_a_module, "randn_tensor", lambda *a, **k: to_torch(step_noise(key, ref.step_index)))
    for i, t in enumerate(ref.timesteps[start_index:], start_index):
        out = fake_model(ref.scale_model_input(x, t), t, torch)
        kwargs = {"eta": eta, "variance_noise": to_torch(step_noise(key, i))} if name == "ddim" else {}
        x = ref.step(out, t, x, **kwargs).prev_sample
    return x.numpy()


def run_ours(name, config, num_steps, noise, key, *, start_index=0, x0=None, eta=0.0):
    sampler = get_sampler(name)
    plan = sampler.make_plan(config, num_steps, **({"eta": eta} if eta else {}))
    model_fn = lambda x, t: fake_model(x, t, jnp)  # noqa: E731
    run = jax.jit(sampler.sample, static_argnums=0, static_argnames="start_index")
    return run(model_fn, noise, key, plan, start_index=start_index, x0=x0)


def assert_close(actual, desired, rtol=1e-5):
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * np.abs(desired).max())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_timesteps_match_diffusers(name, spacing):
    config = dataclasses.replace(SD, timestep_spacing=spacing)
    for num_steps in (1, 7, 10, 50, 999):
        plan = get_sampler(name).make_plan(config, num_steps)
        np.testing.assert_array_equal(plan.timesteps, reference(name, config, num_steps).timesteps.numpy())


@pytest.mark.parametrize("eta", [0.0, ETA])
@pytest.mark.parametrize("config_name", ["sd", "v_linspace"])
def test_ddim_single_steps_match_diffusers(config_name, eta):
    config = CONFIGS[config_name]
    plan = ddim.make_plan(config, 10, eta=eta)
    ref = reference("ddim", config, 10)
    step = jax.jit(ddim.step)
    x, z = jax.random.normal(jax.random.key(1), (2, *SHAPE))
    for i, t in enumerate(ref.timesteps):
        out = fake_model(x, jnp.full((SHAPE[0],), float(t)), jnp)
        ours = step(plan, out, x, i, z)
        theirs = ref.step(to_torch(out), t, to_torch(x), eta=eta, variance_noise=to_torch(z))
        assert_close(ours[0], theirs.prev_sample.numpy())
        assert_close(ours[1], theirs.pred_original_sample.numpy())


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_trajectory_matches_diffusers(name, config_name, monkeypatch):
    config, num_steps = CONFIGS[config_name], 12
    key = jax.random.key(2)
    noise = jax.random.normal(jax.random.key(3), SHAPE)
    eta = ETA if name == "ddim" else 0.0
    ours = run_ours(name, config, num_steps, noise, key, eta=eta)
    assert_close(ours, run_reference(name, config, num_steps, noise, key, eta=eta, monkeypatch=monkeypatch))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_matches_diffusers(name, monkeypatch):
    num_steps, strength = 20, 0.55
    start_index = img2img_start(num_steps, strength)
    key = jax.random.key(4)
    x0, noise = jax.random.normal(jax.random.key(5), (2, *SHAPE))
    ours = run_ours(name, SD, num_steps, noise, key, start_index=start_index, x0=x0)
    theirs = run_reference(name, SD, num_steps, noise, key, start_index=start_index, x0=x0, monkeypatch=monkeypatch)
    assert_close(ours, theirs)


def test_img2img_start_matches_diffusers_pipeline():
    for num_steps in (1, 10, 25, 50):
        for strength in (0.05, 0.3, 0.5, 0.75, 0.99, 1.0):
            if int(num_steps * strength) == 0:
                with pytest.raises(ValueError, match="no denoising step"):
                    img2img_start(num_steps, strength)
                continue
            ref = reference("ddim", SD, num_steps)
            timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
                types.SimpleNamespace(scheduler=ref), num_steps, strength, "cpu"
            )
            start = img2img_start(num_steps, strength)
            np.testing.assert_array_equal(ddim.make_plan(SD, num_steps).timesteps[start:], timesteps.numpy())
    with pytest.raises(ValueError, match="strength"):
        img2img_start(10, 1.5)


@pytest.mark.parametrize("name", ["ddim", "euler_a"])
def test_sample_compiles_once_and_eta_is_traced(name):
    traces = []

    def model_fn(x, t):
        traces.append(None)
        return fake_model(x, t, jnp)

    sampler = get_sampler(name)
    run = jax.jit(lambda noise, key, plan: sampler.sample(model_fn, noise, key, plan))
    noise = jax.random.normal(jax.random.key(6), SHAPE)
    etas = (0.0, 0.5, 1.0) if name == "ddim" else (0.0,)
    outs = []
    for eta in etas:
        for seed in (0, 1):
            outs.append(run(noise, jax.random.key(seed), sampler.make_plan(SD, 8, eta=eta)))
    assert run._cache_size() == 1
    assert len(traces) == 1  # the model is traced once, inside the scan body
    if name == "ddim":
        np.testing.assert_array_equal(outs[0], outs[1])  # eta = 0: the key does not matter
        assert not np.allclose(outs[2], outs[3]) and not np.allclose(outs[0], outs[2])
    else:
        assert not np.allclose(outs[0], outs[1])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="ddim.*dpm\\+\\+2m.*euler.*euler_a"):
        get_sampler("plms")
    with pytest.raises(ValueError, match="eta"):
        get_sampler("euler").make_plan(SD, 10, eta=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        get_sampler("ddim").make_plan(SD, 0)
    plan = get_sampler("ddim").make_plan(SD, 10)
    noise = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="x0"):
        get_sampler("ddim").sample(lambda x, t: x, noise, jax.random.key(0), plan, start_index=3)
    with pytest.raises(ValueError, match="start_index"):
        get_sampler("ddim").sample(lambda x, t: x, noise, jax.random.key(0), plan, start_index=10, x0=noise)
