"""Phase 2: latent diffusion. A UNet (and optionally a text transformer) learns to denoise the
latents of a frozen autoencoder, conditioned on captions, on a device mesh of any size.

``train(config, workdir)`` runs it in the shared loop (``training/loop.py``); its pieces
(``build``, ``init_state``, ``train_step``, ``export``) are importable for tests and other
trainers. Config sections are described in ``configs/tiny.py``.
"""

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdjax import generate, metrics, paths, sharding
from sdjax.checkpoints import export as export_lib, load as load_lib, lora as lora_files
from sdjax.data import DataConfig, builder, latent_cache, make_dataset, prepare_on_all_hosts, preprocess
from sdjax.diffusion.schedule import add_noise, alphas_cumprod, get_target
from sdjax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from sdjax.models.configs import ModelConfigs
from sdjax.models.layers import resolve_attention
from sdjax.models.text_encoder import CLIPTextEncoder
from sdjax.models.unet import UNet
from sdjax.samplers import get_sampler
from sdjax.tokenizer import load_tokenizer, tokenize
from sdjax.train_state import (RUN_ONCE_COMPILER_OPTIONS, TrainState, abstract_sharded, make_optimizer, sharded_init,
                               state_shardings)
from sdjax.training import lora, loop
from sdjax.training.word_tokenizer import write_word_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TrainConfig(loop.LoopConfig):
    """``config.train``; see configs/tiny.py for the meaning of each field."""
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 1e-2
    clip_norm: float = 1.0
    ema_decay: float = 0.9999  # 0: keep no EMA (exports and sample grids then use the trained weights)
    grad_accum: int = 1
    dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"  # the UNet's attention (models.layers.attention); auto: the devices' fused kernel
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = None
    latent_scale: float | None = None  # None: the autoencoder config's scaling_factor
    scale_by_std: bool = False  # measure 1 / std of the first batch's latents instead
    sample_every: int = 0  # 0: no sample grids
    init_from: str | None = None  # a Stable Diffusion checkpoint to start the trained networks from
    cache_latents: bool = False  # encode the dataset once, then train on the cached posteriors
    latent_cache_dir: str | None = None  # None: <workdir>/latent_cache

    def __post_init__(self):
        super().__post_init__()
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype={self.dtype!r}; use one of {sorted(DTYPES)}.")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}.")
        paths.expand_fields(self, "train", ("latent_cache_dir", "init_from"))


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """``config.sample``: fixed prompts for the EMA sample grids (DDIM + classifier-free guidance)."""
    prompts: tuple[str, ...] = ()
    num_steps: int = 20
    guidance_scale: float = 3.0


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
    lora_targets: tuple[lora.Target, ...] = ()  # non-empty: the UNet is frozen and these layers' adapters train
    lora_scale: float = 1.0  # alpha / rank
    lora_dropout: float = 0.0  # > 0: adapters beside the frozen layers, dropout on their inputs


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run builds before its first step."""
    train: TrainConfig
    data: DataConfig  # this host's: the global batch split over processes
    sample: SampleConfig
    configs: ModelConfigs
    mesh: jax.sharding.Mesh
    rules: tuple
    step_config: StepConfig
    tokenizer: Any
    tokenizer_dir: str
    frozen: dict[str, Any]  # frozen VAE (and text encoder) params, empty-caption ids, schedule
    init: Any  # init(key, latent_scale) -> boxed TrainState
    shardings: TrainState
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Any  # jitted train_step(state, batch, frozen) -> (state, metrics)
    latent_cache_dir: str
    start_params: dict[str, Any] | None = None  # host params the trained networks start from (pretrained)
    lora_config: lora.LoraConfig = lora.LoraConfig()

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """What a batch holds: images, or cached posterior moments (``train.cache_latents``), and ids."""
        return ("moments" if self.train.cache_latents else "image", "input_ids")

    @property
    def seq_len(self) -> int:
        return self.configs.text_encoder.max_position_embeddings

    def restore_target(self) -> TrainState:
        """Abstract arrays carrying shardings: what a checkpoint restores into."""
        return abstract_sharded(self.init, self.shardings, jax.random.key(self.train.seed), 1.0)


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


def unet_params(trained: dict[str, Any], frozen: dict[str, Any], cfg: StepConfig) -> Any:
    """The UNet's weights: trained, or (LoRA) the frozen base with the trained adapters merged in."""
    if not cfg.lora_targets:
        return trained["unet"]
    return lora.apply_adapters(frozen["unet"], trained["unet_lora"], cfg.lora_targets, cfg.lora_scale)


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
    if cfg.lora_dropout:
        interceptor = lora.dropout_interceptor(params["unet_lora"], cfg.lora_targets, cfg.lora_scale,
                                               cfg.lora_dropout, jax.random.split(key, 5)[4])
        with nn.intercept_methods(interceptor):
            out = cfg.unet.apply({"params": frozen["unet"]}, x_t.astype(cfg.unet.dtype), t_B, ctx)
    else:
        out = cfg.unet.apply({"params": unet_params(params, frozen, cfg)}, x_t.astype(cfg.unet.dtype), t_B, ctx)
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

def _caption_words(data: DataConfig) -> list[str]:
    """Every word (lower-cased, letters and digits) of the training captions, most frequent first."""
    import collections
    import re

    import tensorflow_datasets as tfds

    b = builder(data)
    source = b.as_data_source(split=data.split, decoders={data.image_key.split("/")[0]: tfds.decode.SkipDecoding()})
    counts = collections.Counter()
    for i in range(len(source)):
        texts = source[i]
        for part in data.text_key.split("/"):
            texts = texts[part]
        for text in [texts] if isinstance(texts, (bytes, str)) else texts:
            text = text.decode("utf-8") if isinstance(text, bytes) else text
            counts.update(re.findall(r"[a-z0-9]+", text.lower()))
    return [w for w, _ in counts.most_common()]


def _tokenizer_dir(config: ml_collections.ConfigDict, workdir: str, data: DataConfig, pretrained_dir: str | None
                   ) -> str:
    """tokenizer.dir, else the pretrained checkpoint's tokenizer, else a word-level one written into
    the workdir from tokenizer.words or (tokenizer.from_captions) the training captions' words."""
    tok = config.tokenizer
    if tok.get("dir"):
        return tok.dir
    if pretrained_dir:
        return pretrained_dir
    if config.get("pretrained"):
        raise ValueError(f"pretrained={config.pretrained} carries no tokenizer (single files do not): set "
                         "tokenizer.dir to a folder with vocab.json and merges.txt of the same model family.")
    if tok.get("from_captions"):
        prepare_on_all_hosts(data)
        words = _caption_words(data)
    elif tok.get("words"):
        words = tok.words.split()
    else:
        raise ValueError("Set tokenizer.dir (a CLIP tokenizer folder), tokenizer.words (a word list for a text "
                         "encoder trained from scratch) or tokenizer.from_captions=True (the training captions' words).")
    folder = os.path.join(workdir, "tokenizer")
    if jax.process_index() == 0:
        write_word_tokenizer(folder, words)
    multihost_utils.sync_global_devices("sdjax tokenizer written")
    return folder


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where the networks come from: model config dicts, and the pretrained parameters, if any.

    With ``abstract=True`` the parameters are ``jax.ShapeDtypeStruct`` trees and ``build`` makes
    a Setup whose step can be lowered and compiled for any devices (``sdjax.aot``) but not run.
    """
    raw: dict[str, Any]
    vae: Any = None  # frozen autoencoder params (None: a random one, smoke tests only)
    text_encoder: Any = None  # frozen text encoder params (None: trained from scratch)
    unet: Any = None  # the UNet's starting params (None: random init, or train.init_from)
    tokenizer_dir: str | None = None
    abstract: bool = False


def _networks(config: ml_collections.ConfigDict) -> Sources:
    """``pretrained`` (one Stable Diffusion checkpoint, read once: architecture, frozen autoencoder
    and text encoder, tokenizer, scheduler and, unless ``unet_from_pretrained=False``, the starting
    UNet; ``model.*`` entries override its configs), or the separate keys of a model trained from
    scratch: ``model``, ``autoencoder.path``, ``text_encoder.pretrained``."""
    model = config.get("model")
    model = model.to_dict() if model is not None else {}
    path = config.get("pretrained")
    if not path:
        if not model.get("unet") or not model.get("text_encoder"):
            raise ValueError("Set pretrained=PATH (a Stable Diffusion checkpoint to fine-tune) or model.unet and "
                             "model.text_encoder (the networks to train from scratch).")
        raw, net = dict(model), {}
        text_path = config.text_encoder.get("pretrained") if "text_encoder" in config else None
        if text_path:
            loaded = load_lib.load(text_path)
            raw["text_encoder"] = loaded.configs.text_encoder.to_transformers_config()
            net["text_encoder"] = loaded.params["text_encoder"]
        vae_path = config.autoencoder.get("path") if "autoencoder" in config else None
        if vae_path:
            vae_config, net["vae"] = load_lib.load_vae(vae_path)
            raw["vae"] = vae_config.to_diffusers_config()
        return Sources(raw, **net)
    taken = [k for k, v in (("autoencoder.path", config.get("autoencoder", {}).get("path")),
                            ("text_encoder.pretrained", config.get("text_encoder", {}).get("pretrained")),
                            ("train.init_from", config.train.get("init_from"))) if v]
    if taken:
        raise ValueError(f"pretrained={path} provides the autoencoder, the text encoder and the UNet: unset "
                         f"{', '.join(taken)}.")
    loaded = load_lib.load(paths.check_local(path, "pretrained"))
    raw = loaded.configs.to_dicts()
    from_pretrained = config.get("unet_from_pretrained", True)
    if model.get("unet") and from_pretrained:
        raise ValueError("model.unet is set, but the UNet comes from pretrained: set unet_from_pretrained=False to "
                         "train model.unet from scratch, or unset model.unet.")
    for name, overrides in model.items():
        if name not in raw:
            raise ValueError(f"model.{name}: not a network; valid: {', '.join(sorted(raw))}.")
        raw[name] = dict(raw[name], **overrides) if name != "unet" else dict(overrides)
    # A UNet trained from scratch attends to the pretrained text encoder's width unless told otherwise.
    raw["unet"].setdefault("cross_attention_dim", raw["text_encoder"]["hidden_size"])
    return Sources(raw, vae=loaded.params["vae"], text_encoder=loaded.params["text_encoder"],
                     unet=loaded.params["unet"] if from_pretrained else None, tokenizer_dir=loaded.tokenizer_dir)


def build(config: ml_collections.ConfigDict, workdir: str, devices=None, sources: Sources | None = None) -> Setup:
    """Validates the config, builds mesh, modules, frozen params, shardings and the jitted step.

    Every user error (mesh, batch, paths, mismatched widths) raises here, before compiling.
    ``sources``: the networks' configs and parameters, instead of reading them as the config says.
    """
    train = TrainConfig(**config.train.to_dict())
    data = DataConfig.from_config(config.data, batch_size=train.batch_size // jax.process_count())
    sample = SampleConfig(**(config.get("sample") or ml_collections.ConfigDict()).to_dict())
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes, devices)
    rules = sharding.filter_rules([tuple(r) for r in config.logical_axis_rules], mesh)
    sharding.check_batch_size(train.batch_size, mesh, rules, train.grad_accum)
    if train.cache_latents and (data.random_crop or data.random_flip):
        raise ValueError("train.cache_latents encodes each image once, so random crops and flips would be frozen "
                         "into the cache: set data.random_crop=False and data.random_flip=False, or turn caching off.")

    nets = sources or _networks(config)
    raw = nets.raw
    configs = ModelConfigs.from_dicts(raw)
    if configs.unet.cross_attention_dim != configs.text_encoder.hidden_size:
        raise ValueError(f"model.unet.cross_attention_dim={configs.unet.cross_attention_dim} must equal the text "
                         f"encoder's hidden_size={configs.text_encoder.hidden_size}.")
    if configs.unet.in_channels != configs.vae.latent_channels:
        raise ValueError(f"model.unet.in_channels={configs.unet.in_channels} must equal the autoencoder's "
                         f"latent_channels={configs.vae.latent_channels}.")
    f = configs.vae.downsample_factor
    levels = 2 ** (len(configs.unet.block_out_channels) - 1)
    if data.image_size % (f * levels):
        raise ValueError(f"data.image_size={data.image_size} must be a multiple of {f * levels} (autoencoder factor "
                         f"{f} x {levels} UNet downsamplings).")

    seq_len = configs.text_encoder.max_position_embeddings
    tokenizer_dir, tokenizer = None, None
    if not nets.abstract:
        tokenizer_dir = _tokenizer_dir(config, workdir, data, nets.tokenizer_dir)
        tokenizer = load_tokenizer(tokenizer_dir)
        if len(tokenizer) > configs.text_encoder.vocab_size:
            raise ValueError(f"The tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but "
                             f"text_encoder.vocab_size is {configs.text_encoder.vocab_size}; raise vocab_size.")

    dtype = DTYPES[train.dtype]
    unet = UNet(configs.unet, dtype=dtype, param_dtype=jnp.float32, remat=train.remat,
                attention=resolve_attention(train.attention, mesh.devices.flat[0].platform, dtype))
    text_encoder = CLIPTextEncoder(configs.text_encoder, dtype=dtype, param_dtype=jnp.float32)
    vae = AutoencoderKL(configs.vae, dtype=jnp.float32, param_dtype=jnp.float32)
    vae_params = nets.vae
    if vae_params is None:  # Smoke tests only: a random frozen autoencoder.
        x = jnp.zeros((1, f, f, configs.vae.in_channels))
        vae_params = jax.jit(lambda k: nn.meta.unbox(vae.init(k, x))["params"],
                             compiler_options=RUN_ONCE_COMPILER_OPTIONS)(
            jax.random.key(config.autoencoder.get("seed", 0)))
    train_text = nets.text_encoder is None
    lora_config = lora.LoraConfig(**config.lora.to_dict()) if "lora" in config else lora.LoraConfig()
    lora_targets, unet_shapes = (), None
    if lora_config.rank:
        if nets.unet is None:
            raise ValueError("lora.rank > 0 trains adapters of a pretrained UNet: set pretrained=PATH (and keep "
                             "unet_from_pretrained=True), or lora.rank=0 to train the whole UNet.")
        if train_text:
            raise ValueError("lora.rank > 0 needs a frozen pretrained text encoder (pretrained=PATH).")
        unet_shapes = jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, levels, levels, configs.unet.in_channels)),
                                     jnp.zeros((1,), jnp.int32), jnp.zeros((1, seq_len, configs.unet.cross_attention_dim)))
        lora_targets = lora.find_targets(nn.meta.unbox(unet_shapes)["params"], tuple(lora_config.targets))
        if lora_config.dropout:
            lora.check_dropout_targets(lora_targets)
    tx, lr = make_optimizer(learning_rate=train.learning_rate, warmup_steps=train.warmup_steps,
                            total_steps=train.steps, schedule=train.schedule, weight_decay=train.weight_decay,
                            clip_norm=train.clip_norm)

    def init(key: jax.Array, latent_scale: jax.Array) -> TrainState:
        k_unet, k_text, k_state = jax.random.split(key, 3)
        if lora_targets:  # only the adapters train (and have optimizer state and EMA)
            params = {"unet_lora": lora.init_adapters(k_unet, lora_targets, lora_config.rank)}
        else:
            params = {"unet": unet.init(k_unet, jnp.zeros((1, levels, levels, configs.unet.in_channels)),
                                        jnp.zeros((1,), jnp.int32),
                                        jnp.zeros((1, seq_len, configs.unet.cross_attention_dim)))["params"]}
        if train_text:
            params["text_encoder"] = text_encoder.init(k_text, jnp.zeros((1, seq_len), jnp.int32))["params"]
        return TrainState.create(params, tx, k_state, extra={"latent_scale": jnp.asarray(latent_scale, jnp.float32)},
                                 ema=train.ema_decay > 0)

    shardings = state_shardings(init, mesh, rules, jax.random.key(train.seed), 1.0)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    frozen = {
        "vae": vae_params,
        "empty_ids": (jax.ShapeDtypeStruct((seq_len,), jnp.int32) if nets.abstract
                      else tokenize(tokenizer, [""], seq_len)[0]),
        "alphas_cumprod": alphas_cumprod(configs.scheduler),
    }
    if not train_text:
        frozen["text_encoder"] = nets.text_encoder
    frozen_shardings = jax.tree.map(lambda _: replicated, frozen)
    if lora_targets:  # the frozen base UNet, sharded like a trained one
        frozen["unet"] = nets.unet
        frozen_shardings["unet"] = sharding.tree_shardings(unet_shapes, mesh, rules)["params"]
    if nets.abstract:
        frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen, frozen_shardings)
    else:
        frozen = jax.device_put(jax.tree.map(jnp.asarray, frozen), frozen_shardings)
    step_config = StepConfig(unet=unet, vae=vae, text_encoder=text_encoder, train_text_encoder=train_text,
                             prediction_type=configs.scheduler.prediction_type,
                             num_train_timesteps=configs.scheduler.num_train_timesteps,
                             caption_dropout=train.caption_dropout, min_snr_gamma=train.min_snr_gamma,
                             grad_accum=train.grad_accum, ema_decay=train.ema_decay, mesh=mesh, rules=rules,
                             lora_targets=lora_targets, lora_scale=lora_config.scale if lora_targets else 1.0,
                             lora_dropout=lora_config.dropout if lora_targets else 0.0)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    batch_keys = ("moments" if train.cache_latents else "image", "input_ids")

    def step_with_lr(state, batch, frozen):
        new_state, m = train_step(state, batch, frozen, cfg=step_config)
        return new_state, dict(m, learning_rate=lr(state.step))

    step_fn = jax.jit(step_with_lr, in_shardings=(shardings, {k: batch_sharding for k in batch_keys}, frozen_shardings),
                      out_shardings=(shardings, replicated), donate_argnums=(0,),
                      compiler_options=RUN_ONCE_COMPILER_OPTIONS if train.fast_compile else None)
    return Setup(train=train, data=data, sample=sample, configs=configs, mesh=mesh, rules=rules,
                 step_config=step_config, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, frozen=frozen, init=init,
                 shardings=shardings, batch_sharding=batch_sharding, step_fn=step_fn,
                 latent_cache_dir=train.latent_cache_dir or os.path.join(workdir, "latent_cache"),
                 start_params={"unet": nets.unet} if nets.unet is not None and not lora_targets else None,
                 lora_config=lora_config)


# ---- data ----------------------------------------------------------------------------------------

def _tokenize_fn(setup: Setup):
    return lambda text: tokenize(setup.tokenizer, [text], setup.seq_len)[0]


def make_iterator(setup: Setup):
    """This host's training batches: images read through the data pipeline, or cached latents."""
    prepare_on_all_hosts(setup.data)
    if setup.train.cache_latents:
        return latent_cache.make_dataset(cached_latents(setup), setup.data)
    return make_dataset(setup.data, tokenize=_tokenize_fn(setup))


def _cache_fingerprint(setup: Setup) -> dict:
    """What a latent cache depends on: the data read, the autoencoder's weights, the tokenizer."""
    vae_hash = hashlib.sha256()
    for leaf in jax.tree.leaves(setup.frozen["vae"]):
        vae_hash.update(np.asarray(leaf.addressable_data(0)).tobytes())
    vocab = json.dumps(sorted(setup.tokenizer.get_vocab().items())).encode()
    skip = ("batch_size", "num_threads", "num_workers", "shuffle", "num_epochs", "shard_index", "shard_count")
    data = {k: v for k, v in dataclasses.asdict(setup.data).items() if k not in skip}
    return {"data": data, "vae_sha256": vae_hash.hexdigest(), "vocab_sha256": hashlib.sha256(vocab).hexdigest(),
            "seq_len": setup.seq_len}


def cached_latents(setup: Setup) -> latent_cache.ChunkSource:
    """The latent cache of the training split, encoding what is missing first (see
    ``sdjax.data.latent_cache``: chunks written as they are encoded, resumable, shared or per host)."""
    cfg = setup.data
    b = builder(cfg)
    source = b.as_data_source(split=cfg.split)
    vae = setup.step_config.vae
    device = jax.local_devices()[0]
    vae_params = jax.device_put(jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), setup.frozen["vae"]), device)
    prepare_example = functools.partial(preprocess, config=cfg, tokenize=_tokenize_fn(setup))

    @jax.jit
    def encode(params, x):
        posterior = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
        return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)

    def examples(start: int, stop: int) -> dict[str, np.ndarray]:
        # A fixed generator per example: a dataset with several captions per image caches one of them.
        rows = [prepare_example(source[i], np.random.default_rng([cfg.seed, i])) for i in range(start, stop)]
        return {"image": np.stack([r["image"] for r in rows]), "input_ids": np.stack([r["input_ids"] for r in rows])}

    return latent_cache.build(
        setup.latent_cache_dir, _cache_fingerprint(setup), len(source), examples,
        encode=lambda images: np.asarray(encode(vae_params, jax.device_put(images, device))),
        batch_size=cfg.batch_size, what=f"{cfg.name}[{cfg.split}]")


def device_batch(setup: Setup, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A host batch (this process's rows) -> the global batch the step takes."""
    return sharding.global_batch({k: host_batch[k] for k in setup.batch_keys}, setup.batch_sharding)


# ---- the start -----------------------------------------------------------------------------------

def measure_latent_scale(setup: Setup, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """1 / std of the (sampled) latents of a global batch, as LDM's ``scale_by_std``."""
    vae = setup.step_config.vae

    @functools.partial(jax.jit, compiler_options=RUN_ONCE_COMPILER_OPTIONS)
    def scale(vae_params, batch, key):
        return _posterior(vae, vae_params, batch).latent_scale(key)

    return scale(setup.frozen["vae"], batch, key)


def init_state(setup: Setup, first_batch: dict[str, jax.Array] | None = None) -> TrainState:
    """A fresh state; the latent scale is measured on ``first_batch`` when ``scale_by_std``."""
    key = jax.random.key(setup.train.seed)
    scale = setup.train.latent_scale if setup.train.latent_scale is not None else setup.configs.vae.scaling_factor
    if setup.train.scale_by_std:
        if first_batch is None:
            raise ValueError("train.scale_by_std needs the first batch to measure the latents' std.")
        scale = measure_latent_scale(setup, first_batch, jax.random.fold_in(key, 1))
    state = sharded_init(setup.init, setup.shardings)(key, jnp.float32(scale))
    if setup.train.init_from:
        loaded = load_lib.load(setup.train.init_from)
        state = _start_from(setup, state, {name: loaded.params[name] for name in state.params},
                            f"train.init_from={setup.train.init_from}")
    elif setup.start_params is not None:
        state = _start_from(setup, state, setup.start_params, "pretrained")
    return state


def _start_from(setup: Setup, state: TrainState, params: dict[str, Any], what: str) -> TrainState:
    """Starts the trained networks (and their EMA) from pretrained parameters."""
    # device_put accepts any shapes that divide the mesh (another width, say), so compare them first.
    shapes = lambda tree: {jax.tree_util.keystr(k): v.shape  # noqa: E731
                           for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    got, want = shapes(params), shapes(state.params)
    if got != want:
        diff = [f"{k}: checkpoint {got.get(k, 'missing')}, config {want.get(k, 'missing')}"
                for k in sorted(got.keys() | want.keys()) if got.get(k) != want.get(k)]
        raise ValueError(f"{what}: its networks do not match config.model ({len(diff)} "
                         f"parameters differ, e.g. {'; '.join(diff[:3])}). Set config.model to the checkpoint's.")
    params = jax.device_put(params, setup.shardings.params)
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params) if state.ema_params is not None else None,
                         opt_state=state.tx.init(params))


# ---- sample grids and export -----------------------------------------------------------------------

def inference_params(setup: Setup, state: TrainState, gather: bool = True) -> dict[str, Any]:
    """The networks for inference: the EMA (or, without one, the trained) UNet and text encoder, the
    frozen VAE; host copies gathered from every process unless ``gather=False``."""
    trained = state.ema_params if state.ema_params is not None else state.params
    text = trained["text_encoder"] if setup.step_config.train_text_encoder else setup.frozen["text_encoder"]
    params = {"unet": unet_params(trained, setup.frozen, setup.step_config), "vae": setup.frozen["vae"],
              "text_encoder": text}
    if not gather:
        return params
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def make_sample_grid(setup: Setup, seed: int = 0):
    """``grid(state) -> uint8 image``: one column per ``sample.prompts``, drawn from the EMA weights
    with fixed noise by ``generate.generate`` (DDIM, classifier-free guidance)."""
    cfg, prompts = setup.step_config, list(setup.sample.prompts)
    plan = get_sampler("ddim").make_plan(setup.configs.scheduler, setup.sample.num_steps)
    fn = jax.jit(functools.partial(generate.generate, generate.Networks(cfg.unet, cfg.vae, cfg.text_encoder), "ddim", 0),
                 compiler_options=RUN_ONCE_COMPILER_OPTIONS if setup.train.fast_compile else None)
    side = setup.data.image_size // setup.configs.vae.downsample_factor
    ids = tokenize(setup.tokenizer, prompts, setup.seq_len)
    noise = np.asarray(jax.random.normal(jax.random.key(seed), (len(prompts), side, side, cfg.unet.config.in_channels)))
    inputs = generate.Inputs(ids, np.broadcast_to(np.asarray(setup.frozen["empty_ids"]), ids.shape), noise)

    def grid(state: TrainState) -> np.ndarray:
        images = fn(inference_params(setup, state, gather=False), inputs, jax.random.key(0), plan,
                    jnp.float32(setup.sample.guidance_scale), state.extra["latent_scale"])
        images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
        return metrics.image_grid(images * 2.0 - 1.0, cols=len(prompts))

    return grid


def export(setup: Setup, state: TrainState, path: str) -> None:
    """Writes the model in ``train.export_format`` (an sdjax export, a diffusers folder or a single
    file; each one ``StableDiffusion.from_pretrained(path)`` loads), with the EMA weights and the
    latent scale used in training as the VAE's ``scaling_factor``. A LoRA run writes its (EMA)
    adapters instead: ``path/pytorch_lora_weights.safetensors`` in ``lora.layout``."""
    if setup.step_config.lora_targets:
        trained = state.ema_params if state.ema_params is not None else state.params
        adapters = jax.tree.map(np.asarray, multihost_utils.process_allgather(trained["unet_lora"], tiled=True))
        if jax.process_index() == 0:
            os.makedirs(path, exist_ok=True)
            alpha = setup.lora_config.alpha if setup.lora_config.alpha is not None else float(setup.lora_config.rank)
            lora_files.save(path, lora.trained_adapters(adapters, setup.step_config.lora_targets, alpha), setup.lora_config.layout)
        multihost_utils.sync_global_devices("sdjax LoRA export written")
        return
    params = inference_params(setup, state)
    scale = float(multihost_utils.process_allgather(state.extra["latent_scale"], tiled=True).reshape(-1)[0])
    if not setup.train.scale_by_std:  # the configured value itself, not its f32 copy in the state
        scale = setup.train.latent_scale if setup.train.latent_scale is not None else setup.configs.vae.scaling_factor
    configs = dataclasses.replace(setup.configs, vae=dataclasses.replace(setup.configs.vae, scaling_factor=scale))
    if jax.process_index() == 0:
        export_lib.save(path, configs, params, setup.tokenizer_dir, format=setup.train.export_format)
    multihost_utils.sync_global_devices("sdjax export written")


# ---- the run -------------------------------------------------------------------------------------

def task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
    """Phase 2 as a task for the shared loop."""
    setup = build(config, workdir)
    hooks = ()
    if setup.train.sample_every and setup.sample.prompts:
        grid = make_sample_grid(setup)
        hooks = (loop.Hook(setup.train.sample_every, lambda step, state, writer: writer.image(
            step, "samples", grid(state))),)
    return loop.Task(
        train=setup.train, step_fn=lambda state, batch: setup.step_fn(state, batch, setup.frozen),
        restore_target=setup.restore_target(), init_state=functools.partial(init_state, setup),
        iterator=make_iterator(setup), device_batch=functools.partial(device_batch, setup), hooks=hooks,
        export=(functools.partial(export, setup, path=setup.train.export_dir) if setup.train.export_dir else None))


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from ``workdir``'s latest checkpoint if any) for ``train.steps`` steps."""
    return loop.train(task, config, workdir)
