"""Phase 1: the perceptual KL autoencoder, trained as CompVis' ``LPIPSWithDiscriminator``
(the loss: ``training/autoencoder_loss.py``).

One jitted step updates the autoencoder, its learned ``logvar`` and the PatchGAN discriminator.
Both networks use Adam(lr, b1=0.5, b2=0.9); one Adam over the joint tree is exactly the
originals' two optimizers, as Adam is element-wise and both step once per batch. No EMA is
kept: the originals export the raw weights.

``train(config, workdir)`` runs it in the shared loop (``training/loop.py``); ``build``,
``train_step``, ``evaluate`` and ``export`` are importable. Config sections are described in
``configs/tiny_autoencoder.py``.
"""

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdjax import metrics, sharding
from sdjax.checkpoints import export as export_lib, load as load_lib
from sdjax.data import DataConfig, make_dataset, prepare_on_all_hosts, splits
from sdjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from sdjax.models.discriminator import NLayerDiscriminator
from sdjax.models.lpips import LPIPS
from sdjax.train_state import (RUN_ONCE_COMPILER_OPTIONS, TrainState, abstract_sharded, make_optimizer, sharded_init,
                               state_shardings)
from sdjax.training import loop
from sdjax.training.autoencoder_loss import LossConfig, Networks, loss_and_grads


@dataclasses.dataclass(frozen=True)
class TrainConfig(loop.LoopConfig):
    """``config.train``; see configs/tiny_autoencoder.py."""
    learning_rate: float = 4.5e-6
    eval_every: int = 500
    eval_images: int = 64  # held-out images for PSNR; the first 8 form the reconstruction grid

    def __post_init__(self):
        super().__post_init__()
        for name in ("eval_every", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
        export_lib.check_format(self.export_format, export_lib.VAE_FORMATS)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the jitted step needs besides arrays (hashable, static)."""
    nets: Networks
    loss: LossConfig
    mesh: jax.sharding.Mesh
    rules: tuple

    @property
    def vae(self) -> AutoencoderKL:
        return self.nets.vae


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: dict[str, Any], *,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of the autoencoder, logvar and discriminator on a global batch {"image": (B,H,W,3)}.

    ``state.params = {"autoencoder", "logvar", "discriminator"}``; ``frozen = {"lpips": params or None}``.
    The posterior sample draws from ``fold_in(state.key, state.step)``.
    """
    with jax.sharding.use_abstract_mesh(cfg.mesh.abstract_mesh), nn.logical_axis_rules(cfg.rules):
        grads, m = loss_and_grads(state.params, frozen["lpips"], batch["image"].astype(jnp.float32),
                                  state.step_key(), state.step, cfg.nets, cfg.loss)
    return state.apply_gradients(grads), m


# ---- building a run ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run builds before its first step."""
    train: TrainConfig
    data: DataConfig  # this host's: the global batch split over processes
    vae_config: AutoencoderConfig
    mesh: jax.sharding.Mesh
    rules: tuple
    step_config: StepConfig
    frozen: dict[str, Any]
    init: Any  # init(key) -> boxed TrainState
    shardings: TrainState
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Any  # jitted train_step(state, batch, frozen) -> (state, metrics)
    reconstruct_fn: Any  # jitted (autoencoder params, images) -> posterior-mode reconstructions

    def restore_target(self) -> TrainState:
        return abstract_sharded(self.init, self.shardings, jax.random.key(self.train.seed))


def build(config: ml_collections.ConfigDict, devices=None) -> Setup:
    """Validates the config, builds mesh, modules, LPIPS, shardings and the jitted step.

    Every user error (mesh, batch, paths, image size) raises here, before compiling.
    """
    train = TrainConfig(**config.train.to_dict())
    loss = LossConfig(**config.loss.to_dict())
    data = DataConfig.from_config(config.data, batch_size=train.batch_size // jax.process_count())
    vae_config = AutoencoderConfig.from_diffusers_config(config.model.to_dict())
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    rules = sharding.filter_rules([tuple(r) for r in config.logical_axis_rules], mesh)
    sharding.check_batch_size(train.batch_size, mesh, rules)
    size = data.image_size
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
    # Adam(lr, b1=0.5, b2=0.9), the originals' choice for both networks.
    tx, _ = make_optimizer(learning_rate=train.learning_rate, warmup_steps=0, total_steps=train.steps, b1=0.5,
                           b2=0.9, weight_decay=0.0, clip_norm=None)

    def init(key: jax.Array) -> TrainState:
        k_vae, k_disc, k_state = jax.random.split(key, 3)
        x = jnp.zeros((1, size, size, vae_config.in_channels))
        params = {"autoencoder": vae.init(k_vae, x)["params"],
                  "logvar": jnp.full((), loss.logvar_init, jnp.float32),
                  "discriminator": disc.init(k_disc, x)["params"]}
        return TrainState.create(params, tx, k_state, ema=False)

    shardings = state_shardings(init, mesh, rules, jax.random.key(train.seed))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    frozen = jax.device_put({"lpips": lpips_params}, replicated)
    step_config = StepConfig(nets=Networks(vae=vae, discriminator=disc, lpips=lpips), loss=loss, mesh=mesh,
                             rules=rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    compiler_options = RUN_ONCE_COMPILER_OPTIONS if train.fast_compile else None
    step_fn = jax.jit(functools.partial(train_step, cfg=step_config),
                      in_shardings=(shardings, {"image": batch_sharding}, replicated),
                      out_shardings=(shardings, replicated), donate_argnums=(0,), compiler_options=compiler_options)

    @functools.partial(jax.jit, out_shardings=replicated, compiler_options=compiler_options)
    def reconstruct_fn(vae_params, images):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return vae.apply({"params": vae_params}, images)

    return Setup(train=train, data=data, vae_config=vae_config, mesh=mesh, rules=rules, step_config=step_config,
                 frozen=frozen, init=init, shardings=shardings, batch_sharding=batch_sharding, step_fn=step_fn,
                 reconstruct_fn=reconstruct_fn)


def init_state(setup: Setup, first_batch: Any = None) -> TrainState:
    """A fresh state (the first batch is not needed)."""
    return sharded_init(setup.init, setup.shardings)(jax.random.key(setup.train.seed))


def make_iterator(setup: Setup):
    """This host's training batches: the training split without the held-out images (``eval_images``)."""
    train_split, eval_split = splits(prepare_on_all_hosts(setup.data), setup.data)
    if jax.process_index() == 0:
        print(f"training on {setup.data.name}[{train_split}], evaluating on [{eval_split}]", flush=True)
    return make_dataset(dataclasses.replace(setup.data, split=train_split))


def device_batch(setup: Setup, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return sharding.global_batch({"image": host_batch["image"]}, setup.batch_sharding)


# ---- evaluation and export -----------------------------------------------------------------------------

def eval_images(setup: Setup) -> np.ndarray:
    """The first ``train.eval_images`` held-out images (``sdjax.data.splits``: the dataset's test split, or
    a slice of the training split that training skips; fewer if it holds fewer), the same on every host."""
    b = prepare_on_all_hosts(setup.data)
    _, eval_split = splits(b, setup.data)
    n = min(setup.train.eval_images, len(b.as_data_source(split=eval_split)))
    cfg = dataclasses.replace(setup.data, split=eval_split, shuffle=False, num_epochs=1, batch_size=n,
                              shard_index=0, shard_count=1)
    return next(make_dataset(cfg))["image"]


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
        return vae.apply({"params": p}, x, method=AutoencoderKL.encode).latent_scale(k)

    return float(multihost_utils.process_allgather(scale(vae_params, jnp.asarray(images), key),
                                                 tiled=True).reshape(-1)[0])


def export(setup: Setup, state: TrainState, path: str, images: np.ndarray) -> AutoencoderConfig:
    """Writes the trained autoencoder as an sdjax autoencoder export or a diffusers ``AutoencoderKL``
    folder (``train.export_format``; the latent trainer's ``autoencoder.path`` reads either), with
    ``scaling_factor`` measured on ``images``."""
    params = jax.tree.map(np.asarray, multihost_utils.process_allgather(state.params["autoencoder"], tiled=True))
    scale = latent_scale(setup, state.params["autoencoder"], images, jax.random.key(setup.train.seed))
    config = dataclasses.replace(setup.vae_config, scaling_factor=scale)
    if jax.process_index() == 0:
        export_lib.save_vae(path, config, params, format=setup.train.export_format)
    multihost_utils.sync_global_devices("sdjax vae export written")
    return config


# ---- the run -----------------------------------------------------------------------------------------

def task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
    """Phase 1 as a task for the shared loop: held-out PSNR and reconstruction grids every
    ``train.eval_every`` steps."""
    setup = build(config)
    iterator = make_iterator(setup)
    held_out = eval_images(setup)

    def evaluate_hook(step: int, state: TrainState, writer: metrics.MetricsWriter) -> None:
        value, grid = evaluate(setup, state.params["autoencoder"], held_out)
        writer.scalars(step, {"eval/psnr": value})
        writer.image(step, "reconstructions", grid)
        if jax.process_index() == 0:
            print(f"step {step}: held-out PSNR {value:.2f} dB", flush=True)

    export_dir = setup.train.export_dir
    return loop.Task(
        train=setup.train, step_fn=lambda state, batch: setup.step_fn(state, batch, setup.frozen),
        restore_target=setup.restore_target(), init_state=functools.partial(init_state, setup), iterator=iterator,
        device_batch=functools.partial(device_batch, setup), hooks=(loop.Hook(setup.train.eval_every, evaluate_hook),),
        export=(lambda state: export(setup, state, export_dir, held_out)) if export_dir else None)


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from ``workdir``'s latest checkpoint if any) for ``train.steps`` steps,
    logging held-out PSNR and reconstruction grids, then exports if ``train.export_dir``."""
    return loop.train(task, config, workdir)
