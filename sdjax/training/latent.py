"""Phase 2: latent diffusion. A UNet (and optionally a text transformer) learns to denoise the
latents of a frozen autoencoder, conditioned on captions, on a device mesh of any size.

``train(config, workdir)`` runs everything; its pieces (``build``, ``init_or_restore``,
``train_step``, ``export``) are importable for tests and other trainers.
Config sections are described in ``configs/tiny.py``.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdjax import metrics, sharding
from sdjax.checkpoints import load as load_lib, sdjax_format, train as train_ckpt
from sdjax.data import DataConfig, latent_cache, make_dataset, prepare
from sdjax.diffusion.schedule import add_noise, alphas_cumprod, get_target
from sdjax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from sdjax.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from sdjax.models.unet import UNet
from sdjax.samplers import get_sampler
from sdjax.models.configs import ModelConfigs
from sdjax.tokenizer import load_tokenizer, tokenize
from sdjax.train_state import (RUN_ONCE_COMPILER_OPTIONS, TrainState, abstract_sharded, make_optimizer, sharded_init,
                               state_shardings)
from sdjax.training.word_tokenizer import write_word_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``config.train``; see configs/tiny.py for the meaning of each field."""
    steps: int = 1000
    batch_size: int = 8  # global, over all hosts
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 1e-2
    clip_norm: float = 1.0
    ema_decay: float = 0.9999
    grad_accum: int = 1
    dtype: str = "float32"
    remat: bool = False
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = None
    seed: int = 0
    latent_scale: float | None = None  # None: the autoencoder config's scaling_factor
    scale_by_std: bool = False  # measure 1 / std of the first batch's latents instead
    checkpoint_every: int = 1000
    max_to_keep: int = 3
    log_every: int = 50
    sample_every: int = 0  # 0: no sample grids
    export_dir: str | None = None
    fast_compile: bool = False  # skip XLA backend optimisation of the step: quick compiles, slower steps (CPU tests)
    init_from: str | None = None  # a Stable Diffusion checkpoint to start the trained networks from
    cache_latents: bool = False  # encode the dataset once, then train on the cached posteriors
    latent_cache_dir: str | None = None  # None: <workdir>/latent_cache

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype={self.dtype!r}; use one of {sorted(DTYPES)}.")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "max_to_keep", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}.")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the jitted step needs besides arrays (hashable, static)."""
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    train_text_encoder: bool
    prediction_type: str
    num_train_timesteps: int
    caption_dropout: float
    min_snr_gamma: float | None
    grad_accum: int
    ema_decay: float
    mesh: jax.sharding.Mesh
    rules: tuple


@dataclasses.dataclass
class Setup:
    """Everything a run builds before its first step."""
    config: ml_collections.ConfigDict
    train: TrainConfig
    configs: ModelConfigs
    mesh: jax.sharding.Mesh
    rules: tuple
    step_config: StepConfig
    tokenizer: Any
    tokenizer_dir: str
    frozen: dict[str, Any]  # frozen VAE (and text encoder) params, empty-caption ids, schedule
    init: Any  # init(key, latent_scale) -> boxed TrainState
    init_fn: Any  # jitted init into the state shardings
    shardings: TrainState
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Any  # jitted train_step(state, batch, frozen) -> (state, metrics)
    latent_scale_default: float  # used unless train.scale_by_std
    batch_keys: tuple[str, ...]  # ("image" or "moments", "input_ids")
    workdir: str


# ---- the step ------------------------------------------------------------------------------------

def min_snr_weight(snr_B: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an epsilon or v-prediction loss."""
    clipped = jnp.minimum(snr_B, gamma)
    return clipped / (snr_B + 1.0) if prediction_type == "v_prediction" else clipped / snr_B


def _posterior(vae: AutoencoderKL, vae_params: Any, batch: dict[str, jax.Array]) -> DiagonalGaussian:
    """The latent posterior of a batch of images, or of cached moments (``train.cache_latents``)."""
    if "moments" in batch:
        return DiagonalGaussian.from_moments(batch["moments"])
    return vae.apply({"params": vae_params}, batch["image"], method=AutoencoderKL.encode)


def _micro_loss(params: Any, frozen: dict, micro: dict, key: jax.Array, latent_scale: jax.Array,
                cfg: StepConfig) -> jax.Array:
    k_drop, k_vae, k_t, k_noise = jax.random.split(key, 4)
    ids = micro["input_ids"]
    B = ids.shape[0]
    drop_B = jax.random.bernoulli(k_drop, cfg.caption_dropout, (B,))
    ids = jnp.where(drop_B[:, None], frozen["empty_ids"][None], ids)
    posterior = _posterior(cfg.vae, frozen["vae"], micro)
    z = jax.lax.stop_gradient(posterior.sample(k_vae) * latent_scale)
    text_params = params["text_encoder"] if cfg.train_text_encoder else frozen["text_encoder"]
    ctx = cfg.text_encoder.apply({"params": text_params}, ids)
    t_B = jax.random.randint(k_t, (B,), 0, cfg.num_train_timesteps)
    noise = jax.random.normal(k_noise, z.shape, jnp.float32)
    ac = frozen["alphas_cumprod"]
    x_t = add_noise(ac, z, noise, t_B)
    out = cfg.unet.apply({"params": params["unet"]}, x_t.astype(cfg.unet.dtype), t_B, ctx)
    target = get_target(ac, z, noise, t_B, cfg.prediction_type)
    err_B = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=(1, 2, 3))
    if cfg.min_snr_gamma:
        a = ac[t_B]
        err_B = err_B * min_snr_weight(a / (1.0 - a), cfg.min_snr_gamma, cfg.prediction_type)
    return jnp.mean(err_B)


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: dict[str, Any], *,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch {"image" (B,H,W,3), "input_ids" (B,L)}; with
    ``train.cache_latents`` the images are replaced by cached posterior "moments" (B,h,w,2C).

    Randomness (caption dropout, VAE sample, timesteps, noise) comes from
    ``fold_in(state.key, state.step)``, so a resumed run repeats an uninterrupted one.
    With ``grad_accum`` = A the batch is split into A interleaved micro-batches (each spread
    over every data-parallel device) whose gradients are averaged in a scan.
    """
    key = state.step_key()
    scale = state.extra["latent_scale"]
    grad_fn = jax.value_and_grad(_micro_loss)
    # Activation constraints (nn.with_logical_constraint in the models) resolve through these two.
    with jax.sharding.use_abstract_mesh(cfg.mesh.abstract_mesh), nn.logical_axis_rules(cfg.rules):
        if cfg.grad_accum == 1:
            loss, grads = grad_fn(state.params, frozen, batch, key, scale, cfg)
        else:
            A = cfg.grad_accum

            def split(x):
                x = x.reshape((x.shape[0] // A, A) + x.shape[1:]).swapaxes(0, 1)
                return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

            micro = jax.tree.map(split, batch)

            def body(acc, i):
                loss_i, grads_i = grad_fn(state.params, frozen, jax.tree.map(lambda x: x[i], micro),
                                          jax.random.fold_in(key, i), scale, cfg)
                return jax.tree.map(jnp.add, acc, (loss_i, grads_i)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zeros, jnp.arange(A))
            loss, grads = jax.tree.map(lambda x: x / A, (loss, grads))
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    new_state = state.apply_gradients(grads, cfg.ema_decay)
    return new_state, {"loss": loss, "grad_norm": grad_norm}


# ---- building a run ------------------------------------------------------------------------------

def _tokenizer_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    tok = config.tokenizer
    if tok.get("dir"):
        return tok.dir
    if not tok.get("words"):
        raise ValueError("Set tokenizer.dir (a CLIP tokenizer folder) or tokenizer.words (a word list for a "
                         "text encoder trained from scratch).")
    folder = os.path.join(workdir, "tokenizer")
    if jax.process_index() == 0:
        write_word_tokenizer(folder, tok.words.split())
    multihost_utils.sync_global_devices("sdjax tokenizer written")
    return folder


def _frozen_text_encoder(config: ml_collections.ConfigDict) -> tuple[TextEncoderConfig | None, Any]:
    path = config.text_encoder.get("pretrained")
    if not path:
        return None, None
    loaded = load_lib.load(path)
    return loaded.configs.text_encoder, loaded.params["text_encoder"]


def build(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Setup:
    """Validates the config, builds mesh, modules, frozen params, shardings and the jitted step.

    Every user error (mesh, batch, paths, mismatched widths) raises here, before compiling.
    """
    train = TrainConfig(**config.train.to_dict())
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    rules = sharding.filter_rules([tuple(r) for r in config.logical_axis_rules], mesh)
    sharding.check_batch_size(train.batch_size, mesh, rules, train.grad_accum)
    if train.cache_latents and (config.data.get("random_crop") or config.data.get("random_flip")):
        raise ValueError("train.cache_latents encodes each image once, so random crops and flips would be frozen "
                         "into the cache: set data.random_crop=False and data.random_flip=False, or turn caching off.")

    raw = dict(config.model.to_dict())
    text_config, text_params = _frozen_text_encoder(config)
    if text_config is not None:
        raw["text_encoder"] = text_config.to_transformers_config() | {"output_layer": text_config.output_layer}
    vae_path = config.autoencoder.get("path")
    if vae_path:
        vae_config, vae_params = load_lib.load_vae(vae_path)
        raw["vae"] = vae_config.to_diffusers_config()
    configs = ModelConfigs.from_dicts(raw)
    if configs.unet.cross_attention_dim != configs.text_encoder.hidden_size:
        raise ValueError(f"model.unet.cross_attention_dim={configs.unet.cross_attention_dim} must equal the text "
                         f"encoder's hidden_size={configs.text_encoder.hidden_size}.")
    if configs.unet.in_channels != configs.vae.latent_channels:
        raise ValueError(f"model.unet.in_channels={configs.unet.in_channels} must equal the autoencoder's "
                         f"latent_channels={configs.vae.latent_channels}.")
    size, f = config.data.image_size, configs.vae.downsample_factor
    levels = 2 ** (len(configs.unet.block_out_channels) - 1)
    if size % (f * levels):
        raise ValueError(f"data.image_size={size} must be a multiple of {f * levels} (autoencoder factor {f} x "
                         f"{levels} UNet downsamplings).")

    tokenizer_dir = _tokenizer_dir(config, workdir)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > configs.text_encoder.vocab_size:
        raise ValueError(f"The tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but text_encoder.vocab_size "
                         f"is {configs.text_encoder.vocab_size}; raise vocab_size.")
    seq_len = configs.text_encoder.max_position_embeddings

    dtype = DTYPES[train.dtype]
    unet = UNet(configs.unet, dtype=dtype, param_dtype=jnp.float32, remat=train.remat)
    text_encoder = CLIPTextEncoder(configs.text_encoder, dtype=dtype, param_dtype=jnp.float32)
    vae = AutoencoderKL(configs.vae, dtype=jnp.float32, param_dtype=jnp.float32)
    if not vae_path:  # Smoke tests only: a random frozen autoencoder.
        x = jnp.zeros((1, f, f, configs.vae.in_channels))
        vae_params = jax.jit(lambda k: nn.meta.unbox(vae.init(k, x))["params"],
                             compiler_options=RUN_ONCE_COMPILER_OPTIONS)(
            jax.random.key(config.autoencoder.get("seed", 0)))
    train_text = text_params is None
    latent_scale_default = train.latent_scale if train.latent_scale is not None else configs.vae.scaling_factor
    tx, lr = make_optimizer(learning_rate=train.learning_rate, warmup_steps=train.warmup_steps,
                            total_steps=train.steps, schedule=train.schedule, weight_decay=train.weight_decay,
                            clip_norm=train.clip_norm)

    def init(key: jax.Array, latent_scale: jax.Array) -> TrainState:
        k_unet, k_text, k_state = jax.random.split(key, 3)
        side = levels
        params = {"unet": unet.init(k_unet, jnp.zeros((1, side, side, configs.unet.in_channels)),
                                    jnp.zeros((1,), jnp.int32),
                                    jnp.zeros((1, seq_len, configs.unet.cross_attention_dim)))["params"]}
        if train_text:
            params["text_encoder"] = text_encoder.init(k_text, jnp.zeros((1, seq_len), jnp.int32))["params"]
        return TrainState.create(params, tx, k_state,
                                 extra={"latent_scale": jnp.asarray(latent_scale, jnp.float32)})

    key0 = jax.random.key(train.seed)
    shardings = state_shardings(init, mesh, rules, key0, 1.0)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    frozen = {
        "vae": vae_params,
        "empty_ids": tokenize(tokenizer, [""], seq_len)[0],
        "alphas_cumprod": alphas_cumprod(configs.scheduler),
    }
    if not train_text:
        frozen["text_encoder"] = text_params
    frozen = jax.device_put(jax.tree.map(jnp.asarray, frozen), replicated)
    step_config = StepConfig(unet=unet, vae=vae, text_encoder=text_encoder, train_text_encoder=train_text,
                             prediction_type=configs.scheduler.prediction_type,
                             num_train_timesteps=configs.scheduler.num_train_timesteps,
                             caption_dropout=train.caption_dropout, min_snr_gamma=train.min_snr_gamma,
                             grad_accum=train.grad_accum, ema_decay=train.ema_decay, mesh=mesh, rules=rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    batch_keys = ("moments" if train.cache_latents else "image", "input_ids")
    batch_shardings = {k: batch_sharding for k in batch_keys}

    def step_with_lr(state, batch, frozen):
        new_state, m = train_step(state, batch, frozen, cfg=step_config)
        return new_state, dict(m, learning_rate=lr(state.step))

    step_fn = jax.jit(step_with_lr, in_shardings=(shardings, batch_shardings, replicated),
                      out_shardings=(shardings, replicated), donate_argnums=(0,),
                      compiler_options=RUN_ONCE_COMPILER_OPTIONS if train.fast_compile else None)
    return Setup(config=config, train=train, configs=configs, mesh=mesh, rules=rules, step_config=step_config,
                  tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, frozen=frozen, init=init, shardings=shardings,
                  init_fn=sharded_init(init, shardings), batch_sharding=batch_sharding, step_fn=step_fn,
                  latent_scale_default=latent_scale_default, batch_keys=batch_keys, workdir=workdir)


def data_config(config: ml_collections.ConfigDict, train: TrainConfig) -> DataConfig:
    """This host's DataConfig: the global batch split evenly over processes."""
    return DataConfig(**config.data.to_dict(), batch_size=train.batch_size // jax.process_count())


def make_iterator(setup: Setup):
    """This host's training batches: images read through the data pipeline, or cached latents."""
    cfg = data_config(setup.config, setup.train)
    if jax.process_index() == 0:
        prepare(cfg)
    multihost_utils.sync_global_devices("sdjax data prepared")
    if setup.train.cache_latents:
        arrays = cached_latents(setup, cfg)
        return latent_cache.make_dataset(arrays, cfg.batch_size, cfg.shard_seed(), shuffle=cfg.shuffle)
    return make_dataset(cfg, tokenize=_tokenize_fn(setup))


def _tokenize_fn(setup: Setup):
    seq_len = setup.configs.text_encoder.max_position_embeddings
    return lambda text: tokenize(setup.tokenizer, [text], seq_len)[0]


def _cache_fingerprint(setup: Setup, cfg: DataConfig) -> dict:
    """What a latent cache depends on: the data read, the autoencoder's weights, the tokenizer."""
    vae_hash = hashlib.sha256()
    for leaf in jax.tree.leaves(setup.frozen["vae"]):
        vae_hash.update(np.asarray(leaf.addressable_data(0)).tobytes())
    vocab = json.dumps(sorted(setup.tokenizer.get_vocab().items())).encode()
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("batch_size", "num_threads", "num_workers")}
    return {"data": data, "vae_sha256": vae_hash.hexdigest(), "vocab_sha256": hashlib.sha256(vocab).hexdigest(),
            "seq_len": setup.configs.text_encoder.max_position_embeddings}


def cached_latents(setup: Setup, cfg: DataConfig) -> dict[str, np.ndarray]:
    """This host's cache ({"moments", "input_ids"}), encoding its shard once if it is absent or stale.

    Each host encodes only its own shard, on its first local device, so no collective is needed.
    """
    shard, shards = cfg.shard()
    root = setup.train.latent_cache_dir or os.path.join(setup.workdir, "latent_cache")
    path = os.path.join(root, f"shard{shard:05d}-of-{shards:05d}")
    fingerprint = _cache_fingerprint(setup, cfg)
    arrays = latent_cache.read(path, fingerprint)
    if arrays is None:
        print(f"caching latents of {cfg.name}[{cfg.split}] (shard {shard + 1}/{shards}) in {path}", flush=True)
        arrays = encode_dataset(setup, cfg)
        latent_cache.write(path, arrays, fingerprint)
        arrays = latent_cache.read(path, fingerprint)
    print(f"training on {len(arrays['moments'])} cached latents from {path}", flush=True)
    return arrays


def encode_dataset(setup: Setup, cfg: DataConfig) -> dict[str, np.ndarray]:
    """One unshuffled pass over this host's shard: posterior moments and token ids of every example."""
    vae = setup.step_config.vae
    device = jax.local_devices()[0]
    vae_params = jax.device_put(jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), setup.frozen["vae"]), device)

    @jax.jit
    def encode(params, x):
        posterior = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
        return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)

    pass_cfg = dataclasses.replace(cfg, shuffle=False, num_epochs=1)
    moments, ids = [], []
    done, t0 = 0, time.perf_counter()
    for batch in make_dataset(pass_cfg, tokenize=_tokenize_fn(setup), drop_remainder=False):
        n = len(batch["image"])
        images = np.zeros((cfg.batch_size,) + batch["image"].shape[1:], np.float32)
        images[:n] = batch["image"]  # The last batch is padded: one compiled shape.
        moments.append(np.asarray(encode(vae_params, jax.device_put(images, device)))[:n])
        ids.append(batch["input_ids"])
        done += n
        if len(moments) % 50 == 0:
            print(f"  encoded {done} images ({done / (time.perf_counter() - t0):.0f} images/s)", flush=True)
    if not moments:
        raise ValueError(f"{cfg.name}[{cfg.split}] shard {cfg.shard()[0]} has no examples to cache.")
    return {"moments": np.concatenate(moments), "input_ids": np.concatenate(ids)}


def device_batch(setup: Setup, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host batch (this process's rows) -> the global batch the step takes."""
    return sharding.global_batch({k: host_batch[k] for k in setup.batch_keys}, setup.batch_sharding)


def measure_latent_scale(setup: Setup, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """1 / std of the (sampled) latents of a global batch, as LDM's ``scale_by_std``."""
    vae = setup.step_config.vae

    @functools.partial(jax.jit, compiler_options=RUN_ONCE_COMPILER_OPTIONS)
    def scale(vae_params, batch, key):
        return 1.0 / jnp.std(_posterior(vae, vae_params, batch).sample(key))

    return scale(setup.frozen["vae"], batch, key)


def init_state(setup: Setup, first_batch: dict[str, jax.Array] | None = None) -> TrainState:
    """A fresh state; the latent scale is measured on ``first_batch`` when ``scale_by_std``."""
    key = jax.random.key(setup.train.seed)
    scale = setup.latent_scale_default
    if setup.train.scale_by_std:
        if first_batch is None:
            raise ValueError("train.scale_by_std needs the first batch to measure the latents' std.")
        scale = measure_latent_scale(setup, first_batch, jax.random.fold_in(key, 1))
    init_from = setup.train.init_from
    state = setup.init_fn(key, jnp.float32(scale))
    if init_from:
        state = _load_init_params(setup, state, init_from)
    return state


def _load_init_params(setup: Setup, state: TrainState, path: str) -> TrainState:
    """Starts the trained networks (and their EMA) from a pretrained Stable Diffusion checkpoint."""
    loaded = load_lib.load(path)
    params = {name: loaded.params[name] for name in state.params}
    # device_put accepts any shapes that divide the mesh (another width, say), so compare them first.
    shapes = lambda tree: {jax.tree_util.keystr(k): v.shape  # noqa: E731
                           for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    got, want = shapes(params), shapes(state.params)
    if got != want:
        diff = [f"{k}: checkpoint {got.get(k, 'missing')}, config {want.get(k, 'missing')}"
                for k in sorted(got.keys() | want.keys()) if got.get(k) != want.get(k)]
        raise ValueError(f"train.init_from={path}: its networks do not match config.model ({len(diff)} "
                         f"parameters differ, e.g. {'; '.join(diff[:3])}). Set config.model to the checkpoint's.")
    params = jax.device_put(params, setup.shardings.params)
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params),
                         opt_state=state.tx.init(params))


# ---- sampling and export ---------------------------------------------------------------------------

def make_sampler(setup: Setup, num_steps: int, guidance_scale: float):
    """A jitted ``sample(ema_params, frozen, ids, noise, latent_scale) -> images in [-1, 1]`` (DDIM, CFG)."""
    cfg = setup.step_config
    ddim = get_sampler("ddim")
    plan = ddim.make_plan(setup.configs.scheduler, num_steps)

    @functools.partial(jax.jit, compiler_options=RUN_ONCE_COMPILER_OPTIONS if setup.train.fast_compile else None)
    def sample(params, frozen, ids_BL, noise, latent_scale):
        text_params = params["text_encoder"] if cfg.train_text_encoder else frozen["text_encoder"]
        empty = jnp.broadcast_to(frozen["empty_ids"], ids_BL.shape)
        ctx = cfg.text_encoder.apply({"params": text_params}, jnp.concatenate([empty, ids_BL]))

        def model_fn(x, t):
            out = cfg.unet.apply({"params": params["unet"]}, jnp.concatenate([x, x]).astype(cfg.unet.dtype),
                                 jnp.concatenate([t, t]), ctx).astype(jnp.float32)
            uncond, cond = jnp.split(out, 2)
            return uncond + guidance_scale * (cond - uncond)

        z = ddim.sample(model_fn, noise, jax.random.key(0), plan)
        return cfg.vae.apply({"params": frozen["vae"]}, z / latent_scale, method=AutoencoderKL.decode)

    return sample


def sample_grid(setup: Setup, state: TrainState, sampler, prompts: list[str], seed: int = 0) -> np.ndarray:
    """Images (uint8 grid, one column per prompt) from the EMA weights for fixed prompts and noise."""
    seq_len = setup.configs.text_encoder.max_position_embeddings
    ids = jnp.asarray(tokenize(setup.tokenizer, prompts, seq_len))
    side = setup.config.data.image_size // setup.configs.vae.downsample_factor
    noise = jax.random.normal(jax.random.key(seed), (len(prompts), side, side, setup.configs.unet.in_channels))
    images = sampler(state.ema_params, setup.frozen, ids, noise, state.extra["latent_scale"])
    images = multihost_utils.process_allgather(images, tiled=True)
    return metrics.image_grid(np.asarray(images), cols=len(prompts))


def inference_params(setup: Setup, state: TrainState) -> dict[str, Any]:
    """Host copies of the networks for inference: EMA UNet (and text encoder), frozen VAE."""
    gather = lambda t: jax.tree.map(np.asarray, multihost_utils.process_allgather(t, tiled=True))  # noqa: E731
    params = {"unet": gather(state.ema_params["unet"]), "vae": gather(setup.frozen["vae"])}
    text = state.ema_params["text_encoder"] if setup.step_config.train_text_encoder else setup.frozen["text_encoder"]
    params["text_encoder"] = gather(text)
    return params


def export(setup: Setup, state: TrainState, path: str) -> None:
    """Writes an sdjax export that ``StableDiffusion.from_pretrained(path)`` loads, with the EMA
    weights and the latent scale used in training as the VAE's ``scaling_factor``."""
    params = inference_params(setup, state)
    scale = float(multihost_utils.process_allgather(state.extra["latent_scale"], tiled=True).reshape(-1)[0])
    configs = dataclasses.replace(setup.configs, vae=dataclasses.replace(setup.configs.vae, scaling_factor=scale))
    if jax.process_index() == 0:
        sdjax_format.save(path, configs.to_dicts(), params, setup.tokenizer_dir)
    multihost_utils.sync_global_devices("sdjax export written")


# ---- the loop ----------------------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from ``workdir``'s latest checkpoint if any) for ``train.steps`` steps."""
    os.makedirs(workdir, exist_ok=True)
    setup = build(config, workdir)
    train_cfg = setup.train
    iterator = make_iterator(setup)
    manager = train_ckpt.make_manager(workdir, train_cfg.max_to_keep)
    target = abstract_sharded(setup.init, setup.shardings, jax.random.key(train_cfg.seed), 1.0)
    state = train_ckpt.restore_latest(manager, target, iterator)
    pending = None
    if state is None:
        pending = device_batch(setup, next(iterator))
        state = init_state(setup, pending)
    writer = metrics.MetricsWriter(workdir, train_cfg.steps, enabled=jax.process_index() == 0)
    sample_cfg = config.get("sample") or ml_collections.ConfigDict()
    sampler = (make_sampler(setup, sample_cfg.get("num_steps", 20), sample_cfg.get("guidance_scale", 3.0))
               if train_cfg.sample_every else None)
    step = int(state.step)
    t_last, step_last = time.perf_counter(), step
    while step < train_cfg.steps:
        batch = pending if pending is not None else device_batch(setup, next(iterator))
        pending = None
        state, m = setup.step_fn(state, batch, setup.frozen)
        step += 1
        if step % train_cfg.log_every == 0 or step == train_cfg.steps:
            m = jax.device_get(m)
            now = time.perf_counter()
            steps_per_sec = (step - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            writer.scalars(step, dict(m, steps_per_sec=steps_per_sec,
                                      images_per_sec=steps_per_sec * train_cfg.batch_size))
            writer.progress(step, float(m["loss"]), steps_per_sec)
        if sampler is not None and (step % train_cfg.sample_every == 0 or step == train_cfg.steps):
            writer.image(step, "samples", sample_grid(setup, state, sampler, list(sample_cfg.prompts)))
        if step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps:
            train_ckpt.save(manager, state, iterator, force=step == train_cfg.steps)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if train_cfg.export_dir:
        export(setup, state, train_cfg.export_dir)
    return state
