"""Phase 2: latent diffusion. A UNet (and optionally a text transformer) learns to denoise the
latents of a frozen autoencoder, conditioned on captions, on a device mesh of any size.

``train(config, workdir)`` reads the config once (``schema.LatentRunConfig``), builds the run
(``build``: networks from ``sdjax.sources``, the step of ``latent_step.py`` jitted by
``builder.compile_step``) and runs it in the shared loop (``loop.py``). Config sections are
described in ``configs/tiny.py``.
"""

import collections
import dataclasses
import functools
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdjax import generate, images as images_lib, paths, sharding, sources as sources_lib
from sdjax.checkpoints import export as export_lib, load as load_lib, lora as lora_files
from sdjax.data import (buckets as buckets_lib, encode as encode_lib, latent_cache, make_dataset, prepare_on_all_hosts,
                        webdataset)
from sdjax.diffusion.schedule import alphas_cumprod
from sdjax.models.autoencoder import AutoencoderKL
from sdjax.models.configs import ModelConfigs, text_encoder_inputs, unet_inputs, vae_inputs
from sdjax.samplers import get_sampler
from sdjax.tokenizer import load_tokenizer, tokenize
from sdjax.train_state import RUN_ONCE_COMPILER_OPTIONS, TrainState, make_optimizer
from sdjax.training import builder, lora, loop, schema
from sdjax.training.latent_step import LatentStep, posterior, text_encoder_params, train_step, unet_params
from sdjax.training.schema import LatentRunConfig
from sdjax.training.word_tokenizer import write_word_tokenizer

DTYPES = {name: getattr(jnp, name) for name in schema.DTYPES}  # the names train.dtype takes


@dataclasses.dataclass(frozen=True)
class LatentRun:
    """A latent-diffusion run, built: its config, its networks' sources, the tokenizer, the step's
    modules and settings, the frozen arrays the step reads, and the jitted program."""
    config: LatentRunConfig
    sources: sources_lib.Sources
    tokenizer: Any  # None for a run built from abstract sources
    tokenizer_dir: str | None
    step: LatentStep
    frozen: dict[str, Any]  # frozen VAE (and text encoders, LoRA base UNet) params, empty-caption ids, schedule
    program: builder.TrainProgram
    dataset: Any  # the prepared TFDS builder of config.data (None for abstract sources)
    workdir: str
    tokenizer_2: Any = None  # SDXL's second tokenizer
    tokenizer_2_dir: str | None = None

    @property
    def configs(self) -> ModelConfigs:
        return self.sources.configs

    @property
    def seq_len(self) -> int:
        return self.configs.text_encoder.max_position_embeddings

    def token_ids(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The captions' ids for each tokenizer, named as the batch carries them ("input_ids", SDXL's "input_ids_2")."""
        ids = {"input_ids": tokenize(self.tokenizer, texts, self.seq_len)}
        if self.tokenizer_2 is not None:
            ids["input_ids_2"] = tokenize(self.tokenizer_2, texts, self.configs.text_encoder_2.max_position_embeddings)
        return ids

    def batch_spec(self, height: int, width: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the step takes for images of ``height`` x ``width`` (or their cached latent
        moments), as abstract arrays on the mesh."""
        B, on_mesh, f = self.config.train.batch_size, self.program.batch_sharding, self.configs.vae.downsample_factor
        shapes = {"image": ((B, height, width, 3), jnp.float32), "input_ids": ((B, self.seq_len), jnp.int32),
                  "moments": ((B, height // f, width // f, 2 * self.configs.vae.latent_channels), jnp.float32)}
        if self.step.sdxl:
            shapes |= {"input_ids_2": ((B, self.configs.text_encoder_2.max_position_embeddings), jnp.int32),
                       "original_size": ((B, 2), jnp.int32), "crop_top_left": ((B, 2), jnp.int32)}
        if self.config.train.cache_text:
            ctx, pooled = self.text_embedding_shapes(B)
            shapes |= {"text_embeds": (ctx.shape, jnp.float32), "pooled_embeds": (pooled.shape, jnp.float32)}
        return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=on_mesh) for k in self.program.batch_keys}

    def text_embedding_shapes(self, batch_size: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """The frozen text encoders' (context, pooled embedding) of ``batch_size`` captions
        (``generate.encode_text``)."""
        ids = {name: jax.ShapeDtypeStruct((batch_size, getattr(self.configs, name).max_position_embeddings), jnp.int32)
               if getattr(self.configs, name) else None for name in ("text_encoder", "text_encoder_2")}
        params = {name: self.frozen[name] for name in self.configs.text_encoder_names}
        return jax.eval_shape(functools.partial(generate.encode_text, self.step.nets), params, ids["text_encoder"],
                              ids["text_encoder_2"])

    @property
    def configured_latent_scale(self) -> float:
        """``train.latent_scale``, else the autoencoder's ``scaling_factor`` (``scale_by_std`` measures it)."""
        scale = self.config.train.latent_scale
        return scale if scale is not None else self.configs.vae.scaling_factor

    @property
    def latent_cache_dir(self) -> str:
        if self.config.train.latent_cache_dir:
            return self.config.train.latent_cache_dir
        return f"{self.workdir}/latent_cache" if paths.is_remote(self.workdir) else os.path.join(self.workdir,
                                                                                                  "latent_cache")


# ---- building a run ------------------------------------------------------------------------------

def _caption_words(dataset: Any, data) -> list[str]:
    """Every word (lower-cased, letters and digits) of the training captions, most frequent first."""
    import tensorflow_datasets as tfds

    source = dataset.as_data_source(split=data.split,
                                    decoders={data.image_key.split("/")[0]: tfds.decode.SkipDecoding()})
    counts = collections.Counter()
    for i in range(len(source)):
        texts = source[i]
        for part in data.text_key.split("/"):
            texts = texts[part]
        for text in [texts] if isinstance(texts, (bytes, str)) else texts:
            text = text.decode("utf-8") if isinstance(text, bytes) else text
            counts.update(re.findall(r"[a-z0-9]+", text.lower()))
    return [w for w, _ in counts.most_common()]


def _tokenizer_dir(config: LatentRunConfig, workdir: str, dataset: Any, pretrained_dir: str | None) -> str:
    """tokenizer.dir, else the pretrained checkpoint's tokenizer, else a word-level one written into
    the workdir from tokenizer.words or (tokenizer.from_captions) the training captions' words."""
    tok = config.tokenizer
    if tok.dir:
        return tok.dir
    if pretrained_dir:
        return pretrained_dir
    if config.model.pretrained:
        raise ValueError(f"pretrained={config.model.pretrained} carries no tokenizer (single files do not): set "
                         "tokenizer.dir to a folder with vocab.json and merges.txt of the same model family.")
    if tok.from_captions:
        words = _caption_words(dataset, config.data)
    elif tok.words:
        words = tok.words.split()
    else:
        raise ValueError("Set tokenizer.dir (a CLIP tokenizer folder), tokenizer.words (a word list for a text "
                         "encoder trained from scratch) or tokenizer.from_captions=True (the training captions' "
                         "words).")
    if paths.is_remote(workdir):  # every host writes the same files locally; host 0 keeps a copy in the bucket
        folder = os.path.join(paths.mirror(workdir), "tokenizer")
        write_word_tokenizer(folder, words)
        if jax.process_index() == 0:
            paths.upload(folder, f"{workdir}/tokenizer")
        return folder
    folder = os.path.join(workdir, "tokenizer")
    if jax.process_index() == 0:
        write_word_tokenizer(folder, words)
    sharding.barrier("tokenizer written")
    return folder


def _check_networks(configs: ModelConfigs, sources: sources_lib.Sources, data) -> None:
    if configs.is_sdxl and not configs.text_encoder:
        raise ValueError("This is SDXL's refiner (one text encoder, an aesthetic score): the latent trainer trains "
                         "SD 1/2 and SDXL base models. Set pretrained to an SDXL base checkpoint.")
    if configs.is_sdxl and (sources.text_encoder is None or sources.text_encoder_2 is None):
        raise ValueError("SDXL trains from a pretrained checkpoint (its frozen text encoders): set pretrained=PATH "
                         "to an SDXL diffusers folder or sdjax export.")
    if configs.text_encoder_2 and not configs.is_sdxl:
        raise ValueError("model.text_encoder_2 is SDXL's; its UNet must read added conditioning "
                         "(addition_embed_type='text_time').")
    width = sum(getattr(configs, name).hidden_size for name in configs.text_encoder_names)
    if configs.unet.cross_attention_dim != width:
        what = "the text encoders' hidden sizes summed" if configs.is_sdxl else "the text encoder's hidden_size"
        raise ValueError(f"model.unet.cross_attention_dim={configs.unet.cross_attention_dim} must equal "
                         f"{what}={width}.")
    if configs.unet.in_channels != configs.vae.latent_channels:
        raise ValueError(f"model.unet.in_channels={configs.unet.in_channels} must equal the autoencoder's "
                         f"latent_channels={configs.vae.latent_channels}.")
    f, levels = configs.vae.downsample_factor, 2 ** (len(configs.unet.block_out_channels) - 1)
    image_size = data.image_size
    if image_size % (f * levels):
        raise ValueError(f"data.image_size={image_size} must be a multiple of {f * levels} (autoencoder factor "
                         f"{f} x {levels} UNet downsamplings).")
    odd = [f"{h}x{w}" for h, w in buckets_lib.parse(data.buckets, image_size) or ()
           if h % (f * levels) or w % (f * levels)]
    if odd:
        raise ValueError(f"data.buckets {', '.join(odd)}: every side must be a multiple of {f * levels} (autoencoder "
                         f"factor {f} x {levels} UNet downsamplings).")


def build(config: LatentRunConfig | ml_collections.ConfigDict, workdir: str, devices=None,
          sources: sources_lib.Sources | None = None) -> LatentRun:
    """Validates the config, reads the networks, prepares the data (once, on every host), builds the
    tokenizer, the frozen arrays, the shardings and the jitted step.

    Every user error (mesh, batch, paths, mismatched widths) raises before compiling. ``sources``:
    the networks as given (abstract ones for ``sdjax.aot``) instead of reading them as the config says.
    """
    if not isinstance(config, LatentRunConfig):
        config = LatentRunConfig.from_config(config)
    train = config.train
    mesh, rules = builder.make_mesh(config.mesh, train.batch_size, devices, train.grad_accum)
    sources = sources or sources_lib.read(config.model)
    configs = sources.configs
    _check_networks(configs, sources, config.data)
    if configs.is_sdxl and config.data.moments_ext:
        raise ValueError("SDXL's micro-conditioning reads each image's crop, which precomputed latent shards "
                         "(data.moments_ext) do not carry: train SDXL on images, or cache their latents with "
                         "train.cache_latents=True (the cache keeps each crop).")
    if train.cache_text and sources.trains_text_encoder:
        raise ValueError("train.cache_text caches the outputs of frozen text encoders, but this run trains its text "
                         "encoder from scratch: set pretrained=PATH (or text_encoder.pretrained), or "
                         "train.cache_text=False.")
    if configs.is_sdxl and config.eval.on:
        raise ValueError("eval (FID, CLIP score) during training supports SD 1/2 models so far: unset eval.every "
                         "for SDXL.")

    nets = sources_lib.generation_networks(configs, DTYPES[train.dtype], attention=train.attention,
                                           platform=mesh.devices.flat[0].platform)
    unet_module, vae = nets.unet.clone(remat=train.remat), nets.vae
    lora_targets, unet_shapes = (), None
    if config.lora.rank:
        if sources.unet is None:
            raise ValueError("lora.rank > 0 trains adapters of a pretrained UNet: set pretrained=PATH (and keep "
                             "unet_from_pretrained=True), or lora.rank=0 to train the whole UNet.")
        if sources.trains_text_encoder:
            raise ValueError("lora.rank > 0 needs a frozen pretrained text encoder (pretrained=PATH).")
        unet_shapes = jax.eval_shape(unet_module.init, jax.random.key(0), *unet_inputs(configs.unet))  # boxed
        lora_targets = lora.find_targets(nn.meta.unbox(unet_shapes)["params"], tuple(config.lora.targets))
        if config.lora.dropout:
            lora.check_dropout_targets(lora_targets)
        if config.lora.text_encoders:
            for name in configs.text_encoder_names:
                lora_targets += lora.find_targets(getattr(sources, name), tuple(config.lora.text_encoder_targets), name)

    tokenizer_dir = tokenizer = tokenizer_2 = dataset = None
    tokenizer_2_dir = sources.tokenizer_2_dir if configs.text_encoder_2 else None
    if configs.text_encoder_2 and not sources.abstract and not tokenizer_2_dir:
        raise ValueError(f"pretrained={config.model.pretrained} carries no second tokenizer: SDXL reads a diffusers "
                         "folder (tokenizer/ and tokenizer_2/) or an sdjax export.")
    if not sources.abstract:
        dataset = prepare_on_all_hosts(config.data)
        tokenizer_dir = _tokenizer_dir(config, workdir, dataset, sources.tokenizer_dir)
        tokenizer = load_tokenizer(tokenizer_dir)
        tokenizer_2 = load_tokenizer(tokenizer_2_dir) if tokenizer_2_dir else None
        for name, tok, folder in (("text_encoder", tokenizer, tokenizer_dir),
                                  ("text_encoder_2", tokenizer_2, tokenizer_2_dir)):
            if tok is not None and len(tok) > getattr(configs, name).vocab_size:
                raise ValueError(f"The tokenizer in {folder} has {len(tok)} tokens but {name}.vocab_size is "
                                 f"{getattr(configs, name).vocab_size}; raise vocab_size.")

    vae_params = sources.vae
    if vae_params is None:  # Smoke tests only: a random frozen autoencoder.
        vae_params = jax.jit(lambda k: nn.meta.unbox(vae.init(k, *vae_inputs(configs.vae)))["params"],
                             compiler_options=RUN_ONCE_COMPILER_OPTIONS)(jax.random.key(config.model.autoencoder.seed))
    tx, lr = make_optimizer(learning_rate=train.learning_rate, warmup_steps=train.warmup_steps,
                            total_steps=train.steps, schedule=train.schedule, weight_decay=train.weight_decay,
                            clip_norm=train.clip_norm)

    def init(key: jax.Array, latent_scale: jax.Array, start: dict[str, Any] | None = None) -> TrainState:
        """A fresh state; ``start``: trained networks' starting parameters, which are not drawn."""
        start = start or {}
        k_unet, k_text, k_state = jax.random.split(key, 3)
        if lora_targets:  # only the adapters train (and have optimizer state and EMA)
            params = {lora.params_key(name):
                      lora.init_adapters(k, lora.of_network(lora_targets, name), config.lora.rank)
                      for name, k in (("unet", k_unet), ("text_encoder", jax.random.fold_in(k_text, 1)),
                                      ("text_encoder_2", jax.random.fold_in(k_text, 2)))
                      if lora.of_network(lora_targets, name)}
        elif "unet" in start:
            params = {"unet": start["unet"]}
        else:
            params = {"unet": unet_module.init(k_unet, *unet_inputs(configs.unet))["params"]}
        if sources.trains_text_encoder:
            params["text_encoder"] = start["text_encoder"] if "text_encoder" in start else nets.text_encoder.init(
                k_text, *text_encoder_inputs(configs.text_encoder))["params"]
        return TrainState.create(params, tx, k_state, extra={"latent_scale": jnp.asarray(latent_scale, jnp.float32)},
                                 ema=train.ema_decay > 0)

    seq_len = configs.text_encoder.max_position_embeddings
    frozen = {"vae": vae_params,
              "empty_ids": (jax.ShapeDtypeStruct((seq_len,), jnp.int32) if sources.abstract
                            else tokenize(tokenizer, [""], seq_len)[0]),
              "alphas_cumprod": alphas_cumprod(configs.scheduler)}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if not sources.trains_text_encoder:
        frozen["text_encoder"] = sources.text_encoder
    if configs.text_encoder_2:
        frozen["text_encoder_2"] = sources.text_encoder_2
    frozen_shardings = jax.tree.map(lambda _: replicated, frozen)
    for name in configs.text_encoder_names:  # frozen encoders split over fsdp like trained networks (SDXL's: 0.8 B)
        if name in frozen:
            shapes = jax.eval_shape(getattr(nets, name).init, jax.random.key(0),
                                    *text_encoder_inputs(getattr(configs, name)))
            frozen_shardings[name] = sharding.tree_shardings(shapes, mesh, rules)["params"]
    if lora_targets:  # the frozen base UNet, sharded like a trained one
        frozen["unet"] = sources.unet
        frozen_shardings["unet"] = sharding.tree_shardings(unet_shapes, mesh, rules)["params"]
    if sources.abstract:
        frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen, frozen_shardings)
    else:
        frozen = jax.device_put(jax.tree.map(jnp.asarray, frozen), frozen_shardings)

    step = LatentStep(unet=unet_module, vae=vae, text_encoder=nets.text_encoder, text_encoder_2=nets.text_encoder_2,
                      train_text_encoder=sources.trains_text_encoder,
                      prediction_type=configs.scheduler.prediction_type,
                      num_train_timesteps=configs.scheduler.num_train_timesteps,
                      caption_dropout=train.caption_dropout, min_snr_gamma=train.min_snr_gamma,
                      grad_accum=train.grad_accum, ema_decay=train.ema_decay, lora_targets=lora_targets,
                      lora_scale=config.lora.scale if lora_targets else 1.0,
                      lora_dropout=config.lora.dropout if lora_targets else 0.0)
    if train.cache_text:  # the text encoders' outputs from the cache
        text_keys = ("text_embeds", "pooled_embeds") if step.sdxl else ("text_embeds",)
    else:
        text_keys = ("input_ids", "input_ids_2") if step.sdxl else ("input_ids",)
    batch_keys = ("moments" if train.cache_latents or config.data.moments_ext else "image",) + text_keys
    if step.sdxl:
        batch_keys += ("original_size", "crop_top_left")
    program = builder.compile_step(
        functools.partial(train_step, step=step), mesh=mesh, rules=rules, init=init, init_args=(1.0,),
        seed=train.seed, batch_keys=batch_keys, frozen_shardings=frozen_shardings, fast_compile=train.fast_compile,
        learning_rate=lr)
    return LatentRun(config=config, sources=sources, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, step=step,
                     frozen=frozen, program=program, dataset=dataset, workdir=workdir, tokenizer_2=tokenizer_2,
                     tokenizer_2_dir=tokenizer_2_dir)


# ---- data ----------------------------------------------------------------------------------------

def _tokenize_fn(run: LatentRun):
    return lambda text: {name: ids[0] for name, ids in run.token_ids([text]).items()}


def make_iterator(run: LatentRun):
    """This host's training batches: images read through the data pipeline, or cached latents."""
    if run.config.train.cache_latents and not run.config.data.moments_ext:  # shards of latents need no cache
        return latent_cache.make_dataset(cached_latents(run), run.config.data)
    return make_dataset(run.config.data, tokenize=_tokenize_fn(run))


def _frozen_text_encoders(run: LatentRun) -> dict[str, Any] | None:
    """The frozen text encoders' weights as whole host arrays on every host (they are sharded over
    fsdp in the step), when the cache keeps their outputs (``train.cache_text``); None otherwise.
    Every host calls this."""
    if not run.config.train.cache_text:
        return None
    frozen = {name: run.frozen[name] for name in run.configs.text_encoder_names}
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(frozen, tiled=True))


def cache_fingerprint(run: LatentRun, text_params: dict[str, Any] | None = None) -> dict:
    """What the run's latent cache depends on (``data.latent_cache.fingerprint``); ``text_params``:
    the frozen text encoders' host weights when the cache keeps their outputs."""
    text = None if text_params is None else {"params": text_params, "dtype": run.config.train.dtype}
    return latent_cache.fingerprint(run.config.data, run.frozen["vae"], run.tokenizer.get_vocab(), run.seq_len,
                                    run.tokenizer_2.get_vocab() if run.tokenizer_2 is not None else None, text)


def cached_latents(run: LatentRun) -> latent_cache.ChunkSource:
    """The latent cache of the training split, encoding what is missing first (``data.latent_cache``):
    each image's posterior moments and, with ``train.cache_text``, each caption's text embeddings
    (``generate.encode_text``, as the step would compute them), on this host's first device."""
    data = run.config.data
    device = jax.local_devices()[0]
    text_params = _frozen_text_encoders(run)
    params = jax.device_put({"vae": jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), run.frozen["vae"]),
                             "text": text_params}, device)
    nets, sdxl = run.step.nets, run.step.sdxl

    @jax.jit
    def encode(params, batch):
        post = nets.vae.apply({"params": params["vae"]}, batch["image"], method=AutoencoderKL.encode)
        out = {"moments": jnp.concatenate([post.mean, post.logvar], axis=-1)}
        if params["text"] is not None:
            ctx, pooled = generate.encode_text(nets, params["text"], batch["input_ids"], batch.get("input_ids_2"))
            out |= {"text_embeds": ctx.astype(jnp.float32)} | ({"pooled_embeds": pooled.astype(jnp.float32)}
                                                                if sdxl else {})
        return out

    def encode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        read = {k: batch[k] for k in ("image", "input_ids", "input_ids_2") if k in batch}
        return jax.tree.map(np.asarray, encode(params, jax.device_put(read, device)))

    return latent_cache.encode_dataset(
        run.latent_cache_dir, data, run.dataset.as_data_source(split=data.split), _tokenize_fn(run), encode_batch,
        cache_fingerprint(run, text_params), example_arrays=tuple(k for k in run.program.batch_keys if k != "moments"))


# ---- the start -----------------------------------------------------------------------------------

def measure_latent_scale(run: LatentRun, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """1 / std of the (sampled) latents of a global batch, as LDM's ``scale_by_std``."""
    vae = run.step.vae

    @functools.partial(jax.jit, compiler_options=RUN_ONCE_COMPILER_OPTIONS)
    def scale(vae_params, batch, key):
        return posterior(vae, vae_params, batch).latent_scale(key)

    return scale(run.frozen["vae"], batch, key)


def init_state(run: LatentRun, first_batch: dict[str, jax.Array] | None = None) -> TrainState:
    """A fresh state; the latent scale is measured on ``first_batch`` when ``scale_by_std``."""
    train = run.config.train
    scale = run.configured_latent_scale
    if train.scale_by_std:
        if first_batch is None:
            raise ValueError("train.scale_by_std needs the first batch to measure the latents' std.")
        scale = measure_latent_scale(run, first_batch, jax.random.fold_in(jax.random.key(train.seed), 1))
    if train.init_from:
        loaded = load_lib.load(train.init_from)
        return _start_from(run, scale, {name: loaded.params[name] for name in run.program.target.params},
                           f"train.init_from={train.init_from}")
    if run.sources.unet is not None and not run.step.lora_targets:
        return _start_from(run, scale, {"unet": run.sources.unet}, "pretrained")
    return run.program.fresh_state(jnp.float32(scale))


def _start_from(run: LatentRun, scale: float, params: dict[str, Any], what: str) -> TrainState:
    """A fresh state whose trained networks (and their EMA) start from pretrained parameters, held
    as f32 master weights."""
    # device_put accepts any shapes that divide the mesh (another width, say), so compare them first.
    shapes = lambda tree: {jax.tree_util.keystr(k): v.shape  # noqa: E731
                           for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    target = run.program.target.params
    got, want = shapes(params), shapes(target)
    if got != want:
        diff = [f"{k}: checkpoint {got.get(k, 'missing')}, config {want.get(k, 'missing')}"
                for k in sorted(got.keys() | want.keys()) if got.get(k) != want.get(k)]
        raise ValueError(f"{what}: its networks do not match config.model ({len(diff)} "
                         f"parameters differ, e.g. {'; '.join(diff[:3])}). Set config.model to the checkpoint's.")
    params = jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), params,
                          {name: target[name] for name in params})  # cast where it is (host or device)
    start = jax.device_put(params, {name: run.program.shardings.params[name] for name in params})
    return run.program.fresh_state(jnp.float32(scale), start=start)


# ---- sample grids and export -----------------------------------------------------------------------

def _trained(state: TrainState) -> dict[str, Any]:
    """The EMA parameters, or the trained ones when the run keeps no EMA."""
    return state.ema_params if state.ema_params is not None else state.params


def inference_params(run: LatentRun, state: TrainState, gather: bool = True) -> dict[str, Any]:
    """The networks for inference: the EMA (or, without one, the trained) UNet and text encoder, the
    frozen VAE (and SDXL's second text encoder); host copies gathered from every process unless
    ``gather=False``."""
    trained = _trained(state)
    params = {"unet": unet_params(trained, run.frozen, run.step), "vae": run.frozen["vae"],
              **text_encoder_params(trained, run.frozen, run.step)}
    if not gather:
        return params
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))


def make_sample_grid(run: LatentRun, seed: int = 0):
    """``grid(state) -> uint8 image``: one column per ``sample.prompts``, drawn from the EMA weights
    with fixed noise by ``generate.generate`` (DDIM, classifier-free guidance against the empty
    caption; SDXL: at ``data.image_size`` square, uncropped, with its zero negative conditioning
    where the model says so)."""
    sample, prompts = run.config.sample, list(run.config.sample.prompts)
    plan = get_sampler("ddim").make_plan(run.configs.scheduler, sample.num_steps)
    fn = jax.jit(functools.partial(generate.generate, run.step.nets, "ddim", 0),
                 compiler_options=RUN_ONCE_COMPILER_OPTIONS if run.config.train.fast_compile else None)
    size = run.config.data.image_size
    side, n = size // run.configs.vae.downsample_factor, len(prompts)
    ids, empty = run.token_ids(prompts), run.token_ids([""] * n)
    noise = np.asarray(jax.random.normal(jax.random.key(seed), (n, side, side, run.configs.unet.in_channels)))
    inputs = generate.Inputs(ids["input_ids"], empty["input_ids"], noise)
    if run.step.sdxl:
        time_ids = np.tile(np.asarray([size, size, 0, 0, size, size], np.float32), (n, 1))
        keep = np.full((n,), 0.0 if run.configs.force_zeros_for_empty_prompt else 1.0, np.float32)
        inputs = inputs.replace(cond_ids_2=ids["input_ids_2"], uncond_ids_2=empty["input_ids_2"], time_ids=time_ids,
                                uncond_time_ids=time_ids, uncond_keep=keep)

    def grid(state: TrainState) -> np.ndarray:
        images = fn(inference_params(run, state, gather=False), inputs, jax.random.key(0), plan,
                    jnp.float32(sample.guidance_scale), state.extra["latent_scale"])
        images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
        return images_lib.signed_grid(images * 2.0 - 1.0, cols=len(prompts))

    return grid


def make_evaluation(run: LatentRun):
    """``evaluate(step, state, writer) -> reached``: the ``eval`` section's FID and CLIP score of the
    EMA (or trained) weights' images, logged as ``eval/fid`` and ``eval/clip_score``; True when every
    target set is reached. The judges and captions are read here, before training starts."""
    from sdjax.evaluation import captions as captions_lib
    from sdjax.evaluation.evaluator import Evaluator, Judges, Protocol

    e = run.config.eval
    judges = Judges.load(inception=e.inception, ref_stats=e.ref_stats, clip=e.clip, clip_config=e.clip_config,
                         clip_tokenizer=e.clip_tokenizer, allow_pickle=e.allow_pickle)
    captions = captions_lib.read(e.captions)[:e.limit or None]
    protocol = Protocol(sampler=e.sampler, steps=e.steps, eta=e.eta, guidance_scale=e.guidance_scale,
                        size=e.size or run.config.data.image_size, negative_prompt=e.negative_prompt, seed=e.seed,
                        batch_size=e.batch_size)
    evaluator = Evaluator(
        generate.Networks(run.step.unet, run.step.vae, run.step.text_encoder), run.configs.scheduler,
        lambda prompts: tokenize(run.tokenizer, prompts, run.seq_len), protocol, judges, run.program.mesh,
        latent_channels=run.configs.vae.latent_channels, downsample_factor=run.configs.vae.downsample_factor,
        native_size=run.config.data.image_size,
        compiler_options=RUN_ONCE_COMPILER_OPTIONS if run.config.train.fast_compile else None)

    def evaluate(step: int, state: TrainState, writer) -> bool:
        result = evaluator(inference_params(run, state, gather=False), captions, state.extra["latent_scale"])
        scalars = result.scalars()
        writer.scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
        reached = e.reached(scalars)
        if jax.process_index() == 0:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scalars.items())
            print(f"eval at step {step} on {result.images} captions: {shown}" +
                  ("; every target reached" if reached else ""), flush=True)
        return reached

    return evaluate


def export(run: LatentRun, state: TrainState, path: str) -> None:
    """Writes the model in ``train.export_format`` (an sdjax export, a diffusers folder or a single
    file; each one ``StableDiffusion.from_pretrained(path)`` loads), with the EMA weights and the
    latent scale used in training as the VAE's ``scaling_factor``. A LoRA run writes its (EMA)
    adapters instead: ``path/pytorch_lora_weights.safetensors`` in ``lora.layout``."""
    if run.step.lora_targets:
        trained = _trained(state)
        adapters = jax.tree.map(np.asarray, multihost_utils.process_allgather(
            {k: v for k, v in trained.items() if k.endswith("_lora")}, tiled=True))
        if jax.process_index() == 0:
            paths.makedirs(path)
            lora_files.save(path, lora.trained_adapters(adapters, run.step.lora_targets, run.config.lora.export_alpha),
                            run.config.lora.layout)
        sharding.barrier("LoRA export written")
        return
    params = inference_params(run, state)
    scale = run.configured_latent_scale  # the configured value itself, not its f32 copy in the state
    if run.config.train.scale_by_std:
        scale = float(multihost_utils.process_allgather(state.extra["latent_scale"], tiled=True).reshape(-1)[0])
    configs = dataclasses.replace(run.configs, vae=dataclasses.replace(run.configs.vae, scaling_factor=scale))
    if jax.process_index() == 0:
        export_lib.save(path, configs, params, run.tokenizer_dir, format=run.config.train.export_format,
                        tokenizer_2_dir=run.tokenizer_2_dir)
    sharding.barrier("export written")


# ---- the run -------------------------------------------------------------------------------------

def bucket_steps(run: LatentRun):
    """``step(state, batch)`` for ``data.buckets``: the step compiled for every bucket's shape before the
    first one runs (so a pod never stops mid-run to compile; several at once, ``CompiledSteps.compile_all``),
    each batch sent to its bucket's program."""
    data = run.config.data
    sizes = buckets_lib.parse(data.buckets, data.image_size)
    steps = run.program.ahead_of_time(run.frozen)
    steps.compile_all(run.program.restore_target(), [run.batch_spec(h, w) for h, w in sizes])
    if jax.process_index() == 0:
        print(f"compiled the step for {len(sizes)} buckets: {', '.join(f'{h}x{w}' for h, w in sizes)}", flush=True)
    return steps


def task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
    """Phase 2 as a task for the shared loop."""
    run = build(config, workdir)
    train = run.config.train
    hooks = ()
    if train.sample_every and run.config.sample.prompts:
        grid = make_sample_grid(run)

        def sample(step: int, state: TrainState, writer) -> None:
            writer.image(step, "samples", grid(state))

        hooks = (loop.Hook(train.sample_every, sample),)
    if run.config.eval.on:
        hooks += (loop.Hook(run.config.eval.every, make_evaluation(run)),)
    elif run.config.eval.every and jax.process_index() == 0:
        print("eval: off (eval.every is set but eval.captions is not)", flush=True)
    step_fn = bucket_steps(run) if run.config.data.buckets else run.program.ahead_of_time(run.frozen)
    return loop.Task(
        train=train, step_fn=step_fn,
        restore_target=run.program.restore_target(), init_state=functools.partial(init_state, run),
        iterator=make_iterator(run), device_batch=run.program.device_batch, hooks=hooks,
        export=functools.partial(export, run, path=train.export_dir) if train.export_dir else None)


def encode(config: ml_collections.ConfigDict, out: str) -> dict[str, int]:
    """``sdjax-train encode``: the config's webdataset image shards (``data.files``) encoded by its
    frozen autoencoder into latent shards under ``out`` (``sdjax.data.encode``), this host's share."""
    config = ml_collections.ConfigDict(config.to_dict())
    # What training does with the shards (caching their latents or captions) is not this command's concern.
    config.train.cache_latents = config.train.cache_text = False
    run_config = LatentRunConfig.from_config(config)
    data = run_config.data
    if data.name != "webdataset" or data.moments_ext:
        raise ValueError("sdjax-train encode reads webdataset shards of images: set data.name=webdataset and "
                         "data.files (and leave data.moments_ext unset).")
    sources = sources_lib.read(run_config.model)
    if sources.vae is None:
        raise ValueError("sdjax-train encode needs a trained autoencoder: set pretrained=PATH or autoencoder.path.")
    vae = sources_lib.generation_networks(sources.configs).vae
    shards = webdataset.Shards.find(data.files)
    return encode_lib.encode_all(list(shards.files), paths.check(out, "--out"), data, vae, sources.vae)


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains (resuming from ``workdir``'s latest checkpoint if any) for ``train.steps`` steps."""
    return loop.train(task, config, workdir)
