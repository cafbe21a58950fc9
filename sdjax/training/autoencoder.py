"""Phase 1: the perceptual KL autoencoder, trained as CompVis' ``LPIPSWithDiscriminator``.

Generator (autoencoder + a learned scalar ``logvar``)::

    rec   = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)          per pixel
    nll   = sum(rec / exp(logvar) + logvar) / B
    loss  = nll + kl_weight * sum(KL) / B + d_weight * disc_factor * g_loss,   g_loss = -mean(D(x_rec))
    d_weight = disc_weight * clip(|grad_W nll| / (|grad_W g_loss| + 1e-4), 0, 1e4), detached,

W the decoder's ``conv_out`` kernel; ``disc_factor`` is 0 before ``disc_start``, and the GAN terms
(adaptive weight, discriminator loss and gradients) are then skipped, not computed and zeroed. The
PatchGAN discriminator minimises ``disc_factor * hinge(D(x), D(x_rec))``. Both networks
use Adam(lr, b1=0.5, b2=0.9); one Adam over the joint tree is exactly the originals' two
optimizers, as Adam is element-wise and both step once per batch.

One jitted step updates both. Unlike the original, which runs the autoencoder again after
its update before the discriminator's turn, the discriminator sees this step's (pre-update)
reconstructions: one autoencoder forward per step instead of two.

``train(config, workdir)`` runs everything; ``build``, ``train_step``, ``evaluate`` and
``export`` are importable. Config sections are described in ``configs/tiny_autoencoder.py``.
"""

import dataclasses
import functools
import logging
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from sdjax import metrics, sharding
from sdjax.checkpoints import load as load_lib, sdjax_format, train as train_ckpt
from sdjax.data import DataConfig, make_dataset, prepare
from sdjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from sdjax.models.discriminator import NLayerDiscriminator
from sdjax.models.lpips import LPIPS
from sdjax.train_state import (RUN_ONCE_COMPILER_OPTIONS, TrainState, abstract_sharded, sharded_init,
                               state_shardings)

ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """``config.loss``: the LPIPSWithDiscriminator hyper-parameters (kl-f8 defaults)."""
    disc_start: int = 50001
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    perceptual_weight: float = 1.0
    logvar_init: float = 0.0
    lpips_path: str | None = None  # None: no LPIPS (perceptual_weight is then 0)

    def __post_init__(self):
        if self.disc_start < 0:
            raise ValueError(f"loss.disc_start must be >= 0, got {self.disc_start}.")
        for name in ("kl_weight", "disc_weight", "disc_factor", "perceptual_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}.")
        if self.lpips_path is not None and not os.path.isfile(self.lpips_path):
            raise FileNotFoundError(f"loss.lpips_path={self.lpips_path}: no such file. Write it with "
                                    "`python -m sdjax.tools.convert_lpips`, or unset it to train without LPIPS.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``config.train``; see configs/tiny_autoencoder.py."""
    steps: int = 1000
    batch_size: int = 8  # global, over all hosts
    learning_rate: float = 4.5e-6
    ema_decay: float = 0.999  # the TrainState keeps an EMA; the export uses the raw params, as the original
    seed: int = 0
    checkpoint_every: int = 1000
    max_to_keep: int = 3
    log_every: int = 50
    eval_every: int = 500
    eval_images: int = 64  # held-out images for PSNR; the first 8 form the reconstruction grid
    export_dir: str | None = None
    fast_compile: bool = False  # skip XLA's backend optimisations (tests: faster compiles, slower steps)

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "max_to_keep", "log_every", "eval_every",
                     "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the jitted step needs besides arrays (hashable, static)."""
    vae: AutoencoderKL
    discriminator: NLayerDiscriminator
    lpips: LPIPS | None  # None: perceptual term off
    loss: LossConfig
    ema_decay: float
    mesh: jax.sharding.Mesh
    rules: tuple


# ---- losses ------------------------------------------------------------------------------------------

def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adopt_weight(weight: float, step: jax.Array, threshold: int) -> jax.Array:
    """``weight`` from step ``threshold`` on, 0 before (taming's ``adopt_weight``)."""
    return jnp.where(step >= threshold, weight, 0.0).astype(jnp.float32)


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """disc_weight * clip(|nll_grad| / (|g_grad| + 1e-4), 0, 1e4), detached."""
    ratio = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + ADAPTIVE_WEIGHT_EPS)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_WEIGHT_MAX)) * disc_weight


def last_layer(vae_params: Any) -> jax.Array:
    """The decoder's output conv kernel, the layer the adaptive weight balances on."""
    return vae_params["decoder"]["conv_out"]["kernel"]


def generator_losses(gen_params: dict, disc_params: Any, lpips_params: Any, images: jax.Array, key: jax.Array,
                     cfg: StepConfig) -> tuple[tuple[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]:
    """((nll_loss, kl_loss, g_loss), aux) for ``gen_params = {"autoencoder", "logvar"}``."""
    vae_vars = {"params": gen_params["autoencoder"]}
    posterior = cfg.vae.apply(vae_vars, images, method=AutoencoderKL.encode)
    rec = cfg.vae.apply(vae_vars, posterior.sample(key), method=AutoencoderKL.decode).astype(jnp.float32)
    B = images.shape[0]
    rec_loss = jnp.abs(images - rec)
    p_loss = jnp.zeros((B,), jnp.float32)
    if cfg.lpips is not None:
        p_loss = cfg.lpips.apply({"params": lpips_params}, images, rec)
        rec_loss = rec_loss + cfg.loss.perceptual_weight * p_loss[:, None, None, None]
    logvar = gen_params["logvar"]
    nll_loss = jnp.sum(rec_loss / jnp.exp(logvar) + logvar) / B
    kl_loss = jnp.sum(posterior.kl()) / B
    g_loss = -jnp.mean(cfg.discriminator.apply({"params": disc_params}, rec))
    aux = {"reconstructions": rec, "rec_loss": jnp.mean(jnp.abs(images - rec)), "p_loss": jnp.mean(p_loss)}
    return (nll_loss, kl_loss, g_loss), aux


# ---- the step ----------------------------------------------------------------------------------------

def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: dict[str, Any], *,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of the autoencoder, logvar and discriminator on a global batch {"image": (B,H,W,3)}.

    ``state.params = {"autoencoder", "logvar", "discriminator"}``; ``frozen = {"lpips": params or None}``.
    The posterior sample draws from ``fold_in(state.key, state.step)``.
    """
    images = batch["image"].astype(jnp.float32)
    params = state.params
    gen_params = {"autoencoder": params["autoencoder"], "logvar": params["logvar"]}
    with jax.sharding.use_abstract_mesh(cfg.mesh.abstract_mesh), nn.logical_axis_rules(cfg.rules):
        fwd = functools.partial(generator_losses, disc_params=params["discriminator"],
                                lpips_params=frozen["lpips"], images=images, key=state.step_key(), cfg=cfg)
        (nll_loss, kl_loss, g_loss), vjp_fn, aux = jax.vjp(fwd, gen_params, has_aux=True)
        one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
        disc_factor = adopt_weight(cfg.loss.disc_factor, state.step, cfg.loss.disc_start)
        fake = jax.lax.stop_gradient(aux["reconstructions"])

        def disc_loss_fn(disc_params):
            # Two calls, not one on the concatenation: BatchNorm normalises each batch on its own.
            real = cfg.discriminator.apply({"params": disc_params}, images)
            fake_logits = cfg.discriminator.apply({"params": disc_params}, fake)
            return disc_factor * hinge_d_loss(real, fake_logits), (jnp.mean(real), jnp.mean(fake_logits))

        def gan_on():
            # Only the last layer's cotangent is used from these two: XLA prunes the rest of each pass.
            (nll_grads,) = vjp_fn((one, zero, zero))
            (g_grads,) = vjp_fn((zero, zero, one))
            d_weight = adaptive_weight(last_layer(nll_grads["autoencoder"]), last_layer(g_grads["autoencoder"]),
                                       cfg.loss.disc_weight)
            (disc_loss, logits), disc_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(params["discriminator"])
            return d_weight, disc_loss, logits, disc_grads

        def gan_off():
            # Before disc_start every GAN term is multiplied by 0: skip computing them. The
            # discriminator's gradients are then exactly zero, as in the originals.
            return zero, zero, (zero, zero), jax.tree.map(jnp.zeros_like, params["discriminator"])

        d_weight, disc_loss, (logits_real, logits_fake), disc_grads = jax.lax.cond(
            disc_factor > 0, gan_on, gan_off)
        (gen_grads,) = vjp_fn((one, jnp.float32(cfg.loss.kl_weight), d_weight * disc_factor))
    grads = dict(gen_grads, discriminator=disc_grads)
    new_state = state.apply_gradients(grads, cfg.ema_decay)
    loss = nll_loss + cfg.loss.kl_weight * kl_loss + d_weight * disc_factor * g_loss
    return new_state, {
        "loss": loss, "nll_loss": nll_loss, "kl_loss": kl_loss, "rec_loss": aux["rec_loss"],
        "p_loss": aux["p_loss"], "g_loss": g_loss, "d_weight": d_weight, "disc_factor": disc_factor,
        "logvar": params["logvar"], "disc_loss": disc_loss, "logits_real": logits_real,
        "logits_fake": logits_fake,
    }


# ---- building a run ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """Everything a run builds before its first step."""
    config: ml_collections.ConfigDict
    train: TrainConfig
    vae_config: AutoencoderConfig
    mesh: jax.sharding.Mesh
    rules: tuple
    step_config: StepConfig
    frozen: dict[str, Any]
    init: Any  # init(key) -> boxed TrainState
    init_fn: Any  # jitted init into the state shardings
    shardings: TrainState
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Any  # jitted train_step(state, batch, frozen) -> (state, metrics)
    reconstruct_fn: Any  # jitted (autoencoder params, images) -> posterior-mode reconstructions


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Adam(lr, b1=0.5, b2=0.9), the originals' choice for both networks."""
    return optax.adam(learning_rate, b1=0.5, b2=0.9)


def build(config: ml_collections.ConfigDict, devices=None) -> Setup:
    """Validates the config, builds mesh, modules, LPIPS, shardings and the jitted step.

    Every user error (mesh, batch, paths, image size) raises here, before compiling.
    """
    train = TrainConfig(**config.train.to_dict())
    loss = LossConfig(**config.loss.to_dict())
    vae_config = AutoencoderConfig.from_diffusers_config(config.model.to_dict())
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    rules = sharding.filter_rules([tuple(r) for r in config.logical_axis_rules], mesh)
    sharding.check_batch_size(train.batch_size, mesh, rules)
    size = config.data.image_size
    disc = NLayerDiscriminator(**config.discriminator.to_dict())
    min_size = 2 ** (disc.n_layers + 2)
    if size % vae_config.downsample_factor or size < min_size:
        raise ValueError(f"data.image_size={size} must be a multiple of the autoencoder's factor "
                         f"{vae_config.downsample_factor} and >= {min_size} for a {disc.n_layers}-layer discriminator.")

    if loss.lpips_path is None:
        if loss.perceptual_weight > 0:
            logging.warning("LPIPS is off: loss.lpips_path is not set, so the perceptual weight is 0 (L1 + KL + GAN "
                            "only). Write the weights with `python -m sdjax.tools.convert_lpips` and set "
                            "--config.loss.lpips_path to use them.")
        lpips, lpips_params = None, None
    else:
        lpips, lpips_params = LPIPS(), load_lib.load_lpips(loss.lpips_path)
    vae = AutoencoderKL(vae_config)
    tx = make_optimizer(train.learning_rate)

    def init(key: jax.Array) -> TrainState:
        k_vae, k_disc, k_state = jax.random.split(key, 3)
        x = jnp.zeros((1, size, size, vae_config.in_channels))
        params = {"autoencoder": vae.init(k_vae, x)["params"],
                  "logvar": jnp.full((), loss.logvar_init, jnp.float32),
                  "discriminator": disc.init(k_disc, x)["params"]}
        return TrainState.create(params, tx, k_state)

    shardings = state_shardings(init, mesh, rules, jax.random.key(train.seed))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    frozen = jax.device_put({"lpips": lpips_params}, replicated)
    step_config = StepConfig(vae=vae, discriminator=disc, lpips=lpips, loss=loss, ema_decay=train.ema_decay,
                             mesh=mesh, rules=rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    compiler_options = RUN_ONCE_COMPILER_OPTIONS if train.fast_compile else None
    step_fn = jax.jit(functools.partial(train_step, cfg=step_config),
                      in_shardings=(shardings, {"image": batch_sharding}, replicated),
                      out_shardings=(shardings, replicated), donate_argnums=(0,), compiler_options=compiler_options)

    @functools.partial(jax.jit, out_shardings=replicated, compiler_options=compiler_options)
    def reconstruct_fn(vae_params, images):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return vae.apply({"params": vae_params}, images)

    return Setup(config=config, train=train, vae_config=vae_config, mesh=mesh, rules=rules,
                 step_config=step_config, frozen=frozen, init=init, init_fn=sharded_init(init, shardings),
                 shardings=shardings,
                 batch_sharding=batch_sharding, step_fn=step_fn, reconstruct_fn=reconstruct_fn)


def init_state(setup: Setup) -> TrainState:
    return setup.init_fn(jax.random.key(setup.train.seed))


def make_iterator(setup: Setup):
    cfg = DataConfig(**setup.config.data.to_dict(), batch_size=setup.train.batch_size // jax.process_count())
    if jax.process_index() == 0:
        prepare(cfg)
    multihost_utils.sync_global_devices("sdjax data prepared")
    return make_dataset(cfg)


def eval_images(setup: Setup) -> np.ndarray:
    """The first ``train.eval_images`` images of the test split (same on every host)."""
    cfg = DataConfig(**setup.config.data.to_dict(), split="test", shuffle=False, num_epochs=1,
                     batch_size=setup.train.eval_images, shard_index=0, shard_count=1)
    if jax.process_index() == 0:
        prepare(cfg)
    multihost_utils.sync_global_devices("sdjax eval data prepared")
    try:
        return next(make_dataset(cfg))["image"]
    except StopIteration:
        raise ValueError(f"train.eval_images={setup.train.eval_images} is more than the test split holds; "
                         "lower it.") from None


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of [-1, 1] images, on the [0, 1] scale."""
    mse = np.mean(np.square((np.clip(reconstructions, -1, 1) - images) / 2.0), axis=(1, 2, 3))
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def evaluate(setup: Setup, vae_params: Any, images: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean PSNR of the posterior-mode reconstructions, a grid: originals above, reconstructions below)."""
    rec = np.asarray(multihost_utils.process_allgather(setup.reconstruct_fn(vae_params, jnp.asarray(images)),
                                                    tiled=True))
    n = min(8, len(images))
    grid = metrics.image_grid(np.concatenate([images[:n], rec[:n]]), cols=n)
    return float(np.mean(psnr(images, rec))), grid


def latent_scale(setup: Setup, vae_params: Any, images: np.ndarray, key: jax.Array) -> float:
    """1 / std of sampled latents (LDM's ``scale_by_std``), the exported ``scaling_factor``."""
    vae = setup.step_config.vae

    @functools.partial(jax.jit, compiler_options=RUN_ONCE_COMPILER_OPTIONS)
    def scale(p, x, k):
        return 1.0 / jnp.std(vae.apply({"params": p}, x, method=AutoencoderKL.encode).sample(k))

    return float(multihost_utils.process_allgather(scale(vae_params, jnp.asarray(images), key),
                                                 tiled=True).reshape(-1)[0])


def export(setup: Setup, state: TrainState, path: str, images: np.ndarray) -> AutoencoderConfig:
    """Writes the trained autoencoder as ``sdjax_format.save_vae`` (what the latent trainer's
    ``autoencoder.path`` loads), with ``scaling_factor`` measured on ``images``."""
    params = jax.tree.map(np.asarray, multihost_utils.process_allgather(state.params["autoencoder"], tiled=True))
    scale = latent_scale(setup, state.params["autoencoder"], images, jax.random.key(setup.train.seed))
    config = dataclasses.replace(setup.vae_config, scaling_factor=scale)
    if jax.process_index() == 0:
        sdjax_format.save_vae(path, config, params)
    multihost_utils.sync_global_devices("sdjax vae export written")
    return config


# ---- the loop ----------------------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from ``workdir``'s latest checkpoint if any) for ``train.steps`` steps,
    logging held-out PSNR and reconstruction grids, then exports if ``train.export_dir``."""
    os.makedirs(workdir, exist_ok=True)
    setup = build(config)
    tc = setup.train
    iterator = make_iterator(setup)
    held_out = eval_images(setup)
    manager = train_ckpt.make_manager(workdir, tc.max_to_keep)
    target = abstract_sharded(setup.init, setup.shardings, jax.random.key(tc.seed))
    state = train_ckpt.restore_latest(manager, target, iterator)
    if state is None:
        state = init_state(setup)
    writer = metrics.MetricsWriter(workdir, tc.steps, enabled=jax.process_index() == 0)
    step = int(state.step)
    t_last, step_last = time.perf_counter(), step
    while step < tc.steps:
        batch = sharding.global_batch({"image": next(iterator)["image"]}, setup.batch_sharding)
        state, m = setup.step_fn(state, batch, setup.frozen)
        step += 1
        if step % tc.log_every == 0 or step == tc.steps:
            m = jax.device_get(m)
            now = time.perf_counter()
            steps_per_sec = (step - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            writer.scalars(step, dict(m, steps_per_sec=steps_per_sec))
            writer.progress(step, float(m["loss"]), steps_per_sec)
        if step % tc.eval_every == 0 or step == tc.steps:
            value, grid = evaluate(setup, state.params["autoencoder"], held_out)
            writer.scalars(step, {"eval/psnr": value})
            writer.image(step, "reconstructions", grid)
            if jax.process_index() == 0:
                print(f"step {step}: held-out PSNR {value:.2f} dB", flush=True)
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            train_ckpt.save(manager, state, iterator, force=step == tc.steps)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if tc.export_dir:
        export(setup, state, tc.export_dir, held_out)
    return state
