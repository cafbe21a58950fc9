"""Phase 1: the perceptual KL autoencoder, trained as CompVis' ``LPIPSWithDiscriminator``
(the loss: ``training/autoencoder_loss.py``).

One jitted step updates the autoencoder, its learned ``logvar`` and the PatchGAN discriminator.
Both networks use Adam(lr, b1=0.5, b2=0.9); one Adam over the joint tree is exactly the
originals' two optimizers, as Adam is element-wise and both step once per batch. No EMA is
kept: the originals export the raw weights.

``train(config, workdir)`` reads the config once (``schema.AutoencoderRunConfig``), builds the run
(``build``: the step jitted by ``builder.compile_step``) and runs it in the shared loop
(``training/loop.py``). Config sections are described in ``configs/tiny_autoencoder.py``.
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

from sdjax import images as images_lib, metrics, sharding
from sdjax.checkpoints import export as export_lib, load as load_lib
from sdjax.data import make_dataset, prepare_on_all_hosts, splits
from sdjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from sdjax.models.discriminator import NLayerDiscriminator
from sdjax.models.lpips import LPIPS
from sdjax.train_state import RUN_ONCE_COMPILER_OPTIONS, TrainState, make_optimizer
from sdjax.training import builder, loop
from sdjax.training.autoencoder_loss import Networks, loss_and_grads
from sdjax.training.schema import AutoencoderRunConfig, LossConfig


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: dict[str, Any], *, nets: Networks,
               loss: LossConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of the autoencoder, logvar and discriminator on a global batch {"image": (B,H,W,3)}.

    ``state.params = {"autoencoder", "logvar", "discriminator"}``; ``frozen = {"lpips": params or None}``.
    The posterior sample draws from ``fold_in(state.key, state.step)``.
    """
    grads, m = loss_and_grads(state.params, frozen["lpips"], batch["image"].astype(jnp.float32),
                              state.step_key(), state.step, nets, loss)
    return state.apply_gradients(grads), m


# ---- building a run ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AutoencoderRun:
    """An autoencoder run, built: its config, the autoencoder's architecture, the loss's networks,
    the frozen LPIPS weights, the jitted program and the jitted reconstruction."""
    config: AutoencoderRunConfig
    vae_config: AutoencoderConfig
    nets: Networks
    frozen: dict[str, Any]
    program: builder.TrainProgram
    reconstruct_fn: Any  # jitted (autoencoder params, images) -> posterior-mode reconstructions
    dataset: Any  # the prepared TFDS builder of config.data

    @property
    def splits(self) -> tuple[str, str]:
        """(training split, held-out split): see ``sdjax.data.splits``."""
        return splits(self.dataset, self.config.data)


def build(config: AutoencoderRunConfig | ml_collections.ConfigDict, devices=None) -> AutoencoderRun:
    """Validates the config, builds mesh, modules, LPIPS, shardings and the jitted step, and prepares
    the data (once, on every host).

    Every user error (mesh, batch, paths, image size) raises here, before compiling.
    """
    if not isinstance(config, AutoencoderRunConfig):
        config = AutoencoderRunConfig.from_config(config)
    train, loss = config.train, config.loss
    vae_config = AutoencoderConfig.from_diffusers_config(config.model)
    mesh, rules = builder.make_mesh(config.mesh, train.batch_size, devices)
    size = config.data.image_size
    disc = NLayerDiscriminator(ndf=config.discriminator.ndf, n_layers=config.discriminator.n_layers)
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

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    nets = Networks(vae=vae, discriminator=disc, lpips=lpips)
    program = builder.compile_step(functools.partial(train_step, nets=nets, loss=loss), mesh=mesh, rules=rules,
                                   init=init, init_args=(), seed=train.seed, batch_keys=("image",),
                                   frozen_shardings=replicated, fast_compile=train.fast_compile)

    @functools.partial(jax.jit, out_shardings=replicated,
                       compiler_options=RUN_ONCE_COMPILER_OPTIONS if train.fast_compile else None)
    def reconstruct_fn(vae_params, images):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return vae.apply({"params": vae_params}, images)

    return AutoencoderRun(config=config, vae_config=vae_config, nets=nets,
                          frozen=jax.device_put({"lpips": lpips_params}, replicated), program=program,
                          reconstruct_fn=reconstruct_fn, dataset=prepare_on_all_hosts(config.data))


def init_state(run: AutoencoderRun, first_batch: Any = None) -> TrainState:
    """A fresh state (the first batch is not needed)."""
    return run.program.fresh_state()


def make_iterator(run: AutoencoderRun):
    """This host's training batches: the training split without the held-out images (``eval_images``)."""
    data = run.config.data
    train_split, eval_split = run.splits
    if jax.process_index() == 0:
        print(f"training on {data.name}[{train_split}], evaluating on [{eval_split}]", flush=True)
    return make_dataset(dataclasses.replace(data, split=train_split))


# ---- evaluation and export -----------------------------------------------------------------------------

def eval_images(run: AutoencoderRun) -> np.ndarray:
    """The first ``train.eval_images`` held-out images (``sdjax.data.splits``: the dataset's test split, or
    a slice of the training split that training skips; fewer if it holds fewer), the same on every host."""
    _, eval_split = run.splits
    n = min(run.config.train.eval_images, len(run.dataset.as_data_source(split=eval_split)))
    cfg = dataclasses.replace(run.config.data, split=eval_split, shuffle=False, num_epochs=1, batch_size=n,
                              shard_index=0, shard_count=1)
    return next(make_dataset(cfg))["image"]


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of [-1, 1] images, on the [0, 1] scale."""
    mse = np.mean(np.square((np.clip(reconstructions, -1, 1) - images) / 2.0), axis=(1, 2, 3))
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def evaluate(run: AutoencoderRun, vae_params: Any, images: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean PSNR of the posterior-mode reconstructions, a grid: originals above, reconstructions below)."""
    rec = np.asarray(multihost_utils.process_allgather(run.reconstruct_fn(vae_params, jnp.asarray(images)),
                                                    tiled=True))
    n = min(8, len(images))
    grid = images_lib.signed_grid(np.concatenate([images[:n], rec[:n]]), cols=n)
    return float(np.mean(psnr(images, rec))), grid


def latent_scale(run: AutoencoderRun, vae_params: Any, images: np.ndarray, key: jax.Array) -> float:
    """1 / std of sampled latents (LDM's ``scale_by_std``), the exported ``scaling_factor``."""
    vae = run.nets.vae

    @functools.partial(jax.jit, compiler_options=RUN_ONCE_COMPILER_OPTIONS)
    def scale(p, x, k):
        return vae.apply({"params": p}, x, method=AutoencoderKL.encode).latent_scale(k)

    return float(multihost_utils.process_allgather(scale(vae_params, jnp.asarray(images), key),
                                                 tiled=True).reshape(-1)[0])


def export(run: AutoencoderRun, state: TrainState, path: str, images: np.ndarray) -> AutoencoderConfig:
    """Writes the trained autoencoder as an sdjax autoencoder export or a diffusers ``AutoencoderKL``
    folder (``train.export_format``; the latent trainer's ``autoencoder.path`` reads either), with
    ``scaling_factor`` measured on ``images``."""
    params = jax.tree.map(np.asarray, multihost_utils.process_allgather(state.params["autoencoder"], tiled=True))
    scale = latent_scale(run, state.params["autoencoder"], images, jax.random.key(run.config.train.seed))
    config = dataclasses.replace(run.vae_config, scaling_factor=scale)
    if jax.process_index() == 0:
        export_lib.save_vae(path, config, params, format=run.config.train.export_format)
    sharding.barrier("autoencoder export written")
    return config


# ---- the run -----------------------------------------------------------------------------------------

def task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
    """Phase 1 as a task for the shared loop: held-out PSNR and reconstruction grids every
    ``train.eval_every`` steps."""
    run = build(config)
    iterator = make_iterator(run)
    held_out = eval_images(run)
    train = run.config.train

    def evaluate_hook(step: int, state: TrainState, writer: metrics.MetricsWriter) -> None:
        value, grid = evaluate(run, state.params["autoencoder"], held_out)
        writer.scalars(step, {"eval/psnr": value})
        writer.image(step, "reconstructions", grid)
        if jax.process_index() == 0:
            print(f"step {step}: held-out PSNR {value:.2f} dB", flush=True)

    return loop.Task(
        train=train, step_fn=run.program.ahead_of_time(run.frozen),
        restore_target=run.program.restore_target(), init_state=functools.partial(init_state, run), iterator=iterator,
        device_batch=run.program.device_batch, hooks=(loop.Hook(train.eval_every, evaluate_hook),),
        export=(lambda state: export(run, state, train.export_dir, held_out)) if train.export_dir else None)


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from ``workdir``'s latest checkpoint if any) for ``train.steps`` steps,
    logging held-out PSNR and reconstruction grids, then exports if ``train.export_dir``."""
    return loop.train(task, config, workdir)
