"""Every training config section as a frozen dataclass, and the two trainers' whole configs.

A config file (``configs/``) builds its sections from these classes (``configs.section``), and a
trainer reads the ``ConfigDict`` once, at its entry point, into ``LatentRunConfig`` or
``AutoencoderRunConfig``; nothing below reads the raw dict. Each class checks its own values and
says what is wrong and how to fix it. This module imports no trainer, model or data reader.
"""

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from sdjax import paths
from sdjax.checkpoints.formats import LORA_LAYOUTS, VAE_FORMATS, check_format
from sdjax.configs import read_section

DTYPES = ("float32", "bfloat16", "float16")
# The layers diffusers' LoRA training scripts adapt by default, plus the transformers' projections and
# feed-forward (PEFT ``target_modules``: suffixes of the PyTorch module names).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
# The text encoders' attention projections, as diffusers' LoRA scripts adapt them with --train_text_encoder.
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The ``config.train`` fields every phase shares."""
    steps: int = 1000
    batch_size: int = 8  # global, over all hosts
    learning_rate: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 1000
    max_to_keep: int = 3
    log_every: int = 50
    export_dir: str | None = None
    export_format: str = "sdjax"  # sdjax | diffusers | single_file (the autoencoder phase: sdjax | diffusers)
    fast_compile: bool = False  # skip XLA backend optimisation of the step: quick compiles, slower steps (CPU tests)

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "max_to_keep", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
        paths.expand_fields(self, "train", ("export_dir",))
        check_format(self.export_format)
        if self.export_format == "single_file" and self.export_dir and not self.export_dir.endswith(".safetensors"):
            raise ValueError(f"train.export_format=single_file writes one file: give an export path ending in "
                             f".safetensors, not {self.export_dir!r}.")


@dataclasses.dataclass(frozen=True)
class LatentTrainConfig(LoopConfig):
    """``config.train`` of the latent phase; see configs/tiny.py for the meaning of each field."""
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
    # with cache_latents: cache the frozen text encoders' outputs too (no text encoder in the step)
    cache_text: bool = False
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
class AutoencoderTrainConfig(LoopConfig):
    """``config.train`` of the autoencoder phase; see configs/tiny_autoencoder.py."""
    learning_rate: float = 4.5e-6
    eval_every: int = 500
    eval_images: int = 64  # held-out images for PSNR; the first 8 form the reconstruction grid

    def __post_init__(self):
        super().__post_init__()
        for name in ("eval_every", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
        check_format(self.export_format, VAE_FORMATS)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """``config.sample``: fixed prompts for the EMA sample grids (DDIM + classifier-free guidance)."""
    prompts: tuple[str, ...] = ()
    num_steps: int = 20
    guidance_scale: float = 3.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """``config.eval``: FID and CLIP score of the EMA weights' images (the trained ones without EMA)
    every ``every`` steps and after the last (when ``captions`` is set), drawn from them as MLPerf draws them
    (``sdjax.evaluation.evaluator``); logged as ``eval/fid`` and ``eval/clip_score``. Training stops
    at the first evaluation that reaches every target set (``target_fid``: FID at most; ``target_clip``:
    CLIP score at least)."""
    every: int = 0  # 0: never; without captions, never either
    captions: str | None = None  # MLPerf's val2014_30k.tsv, or a captioned folder's metadata.jsonl
    limit: int = 0  # the first N captions; 0: all
    ref_stats: str | None = None  # FID: the reference statistics (.npz) ...
    inception: str | None = None  # ... and pytorch-fid's Inception weights
    clip: str | None = None  # CLIP score: open_clip weights ...
    clip_tokenizer: str | None = None  # ... and CLIP's tokenizer (open_clip's bpe file or a folder)
    clip_config: str | None = None  # open_clip's model config JSON; None: ViT-H-14
    allow_pickle: bool = False  # read .pth/.bin judges (torch.load(weights_only=True))
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 8.0
    size: int = 0  # the image side; 0: data.image_size
    negative_prompt: str = ""
    seed: int = 0
    batch_size: int = 64  # images per compiled call over all devices
    target_fid: float | None = None
    target_clip: float | None = None

    def __post_init__(self):
        paths.expand_fields(self, "eval", ("captions", "ref_stats", "inception", "clip", "clip_tokenizer",
                                           "clip_config"))
        if self.every < 0 or self.limit < 0 or self.steps < 1 or self.batch_size < 1 or self.size < 0:
            raise ValueError("eval.every, eval.limit and eval.size must be >= 0, eval.steps and eval.batch_size >= 1.")
        if not self.on:
            return
        if bool(self.ref_stats) != bool(self.inception) or bool(self.clip) != bool(self.clip_tokenizer):
            raise ValueError("eval: FID needs both eval.ref_stats and eval.inception; the CLIP score both eval.clip "
                             "and eval.clip_tokenizer.")
        if not self.ref_stats and not self.clip:
            raise ValueError("eval.every > 0 but nothing to measure: set eval.ref_stats and eval.inception (FID), "
                             "eval.clip and eval.clip_tokenizer (CLIP score), or both.")
        if self.target_fid is not None and not self.ref_stats or self.target_clip is not None and not self.clip:
            raise ValueError("eval: a target needs its metric (target_fid: eval.inception and eval.ref_stats; "
                             "target_clip: eval.clip and eval.clip_tokenizer).")

    @property
    def on(self) -> bool:
        """Evaluations run when both ``every`` and ``captions`` are set."""
        return bool(self.every and self.captions)

    def reached(self, scalars: dict[str, float]) -> bool:
        """Whether measured ``scalars`` (fid, clip_score) meet every target set (False when none is)."""
        targets = [(self.target_fid, "fid", -1), (self.target_clip, "clip_score", 1)]
        checks = [sign * (scalars[name] - target) >= 0 for target, name, sign in targets if target is not None]
        return bool(checks) and all(checks)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """``config.tokenizer``: ``dir`` (a CLIP tokenizer folder), else the pretrained checkpoint's, else a
    word-level one written into the workdir from ``words`` or (``from_captions``) the training captions."""
    dir: str | None = None
    words: str | None = None
    from_captions: bool = False

    def __post_init__(self):
        paths.expand_fields(self, "tokenizer", ("dir",))


@dataclasses.dataclass(frozen=True)
class AutoencoderSource:
    """``config.autoencoder``: the frozen VAE of a model trained from scratch: an autoencoder export
    (phase 1's) or any SD checkpoint; None: a random frozen VAE seeded by ``seed`` (smoke tests)."""
    path: str | None = None
    seed: int = 0

    def __post_init__(self):
        paths.expand_fields(self, "autoencoder", ("path",))


@dataclasses.dataclass(frozen=True)
class TextEncoderSource:
    """``config.text_encoder``: ``pretrained`` = a checkpoint whose text encoder is used frozen;
    None: the text encoder trains from scratch."""
    pretrained: str | None = None

    def __post_init__(self):
        paths.expand_fields(self, "text_encoder", ("pretrained",))


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the latent phase's networks come from (``sdjax.sources`` reads them).

    ``pretrained``: one Stable Diffusion checkpoint giving the architecture, the frozen autoencoder
    and text encoder, the tokenizer, the scheduler and (``unet_from_pretrained``) the starting UNet;
    ``model`` entries override its configs (``model.unet`` replaces the UNet's). Without it: ``model``
    holds every network's config, ``autoencoder`` and ``text_encoder`` say which are pretrained."""
    pretrained: str | None = None
    unet_from_pretrained: bool = True
    model: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    autoencoder: AutoencoderSource = AutoencoderSource()
    text_encoder: TextEncoderSource = TextEncoderSource()

    def __post_init__(self):
        paths.expand_fields(self, "config", ("pretrained",))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``config.lora``: ``rank`` > 0 trains UNet adapters instead of the UNet (``text_encoders``: and
    adapters of the frozen text encoders, both of SDXL's)."""
    rank: int = 0  # 0: no LoRA, the whole UNet trains
    alpha: float | None = None  # the update is scaled by alpha / rank; None: alpha = rank
    targets: tuple[str, ...] = LORA_TARGETS  # module-name suffixes of the adapted layers
    dropout: float = 0.0  # PEFT's lora_dropout: dropout on each UNet adapter's input (training only)
    layout: str = "peft"  # the export: peft (diffusers' load_lora_weights) or kohya (A1111, ComfyUI)
    text_encoders: bool = False  # also adapt the text encoders' text_encoder_targets
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_LORA_TARGETS

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0: no LoRA), got {self.rank}.")
        if self.layout not in LORA_LAYOUTS:
            raise ValueError(f"lora.layout={self.layout!r}; choose one of {', '.join(LORA_LAYOUTS)}.")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}.")
        if self.text_encoders and self.dropout:
            raise ValueError("lora.dropout applies to the UNet's adapters, which run beside its layers; the text "
                             "encoders' adapters are merged: set lora.dropout=0 with lora.text_encoders=True.")

    @property
    def scale(self) -> float:
        return self.export_alpha / self.rank

    @property
    def export_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """``config.mesh`` (``shape``, -1 = fill with all devices; axis names) and ``config.logical_axis_rules``
    (logical axis name -> mesh axes; the first applicable rule wins, indivisible dims replicate)."""
    shape: tuple[int, ...] = (-1, 1)
    axes: tuple[str, ...] = ("data", "fsdp")
    rules: tuple[tuple[str, Any], ...] = ()


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
        paths.expand_fields(self, "loss", ("lpips_path",), local={"lpips_path": "copy the weights to this host"})
        if self.lpips_path is not None and not os.path.isfile(self.lpips_path):
            raise FileNotFoundError(f"loss.lpips_path={self.lpips_path}: no such file. Write it with "
                                    "`python -m sdjax.tools.convert_lpips`, or unset it to train without LPIPS.")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """``config.discriminator``: the PatchGAN's base width and number of strided layers."""
    ndf: int = 64
    n_layers: int = 3


def _mesh(config: ml_collections.ConfigDict) -> MeshConfig:
    mesh = read_section(MeshConfig, config.get("mesh"), "mesh", exclude=("rules",))
    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                  for name, axes in config.get("logical_axis_rules", ()))
    return dataclasses.replace(mesh, shape=tuple(mesh.shape), axes=tuple(mesh.axes), rules=rules)


def _data(config: ml_collections.ConfigDict, batch_size: int):
    from sdjax.data import DataConfig  # the data reader's dataclass: imported here so inference never imports grain

    return DataConfig.from_config(config.data, batch_size=batch_size // jax.process_count())


@dataclasses.dataclass(frozen=True)
class LatentRunConfig:
    """The latent phase's whole config, read once (``from_config``)."""
    train: LatentTrainConfig
    data: Any  # sdjax.data.DataConfig: this host's, the global batch split over processes
    sample: SampleConfig
    eval: EvalConfig
    model: ModelSource
    tokenizer: TokenizerConfig
    lora: LoraConfig
    mesh: MeshConfig

    def __post_init__(self):
        if self.model.pretrained:
            taken = [k for k, v in (("autoencoder.path", self.model.autoencoder.path),
                                    ("text_encoder.pretrained", self.model.text_encoder.pretrained),
                                    ("train.init_from", self.train.init_from)) if v]
            if taken:
                raise ValueError(f"pretrained={self.model.pretrained} provides the autoencoder, the text encoder and "
                                 f"the UNet: unset {', '.join(taken)}.")
            if self.model.model.get("unet") and self.model.unet_from_pretrained:
                raise ValueError("model.unet is set, but the UNet comes from pretrained: set "
                                 "unet_from_pretrained=False to train model.unet from scratch, or unset model.unet.")
        if self.train.cache_latents and self.data.name == "webdataset" and not self.data.moments_ext:
            raise ValueError("train.cache_latents encodes a dataset read by index; webdataset shards are a stream. "
                             "Train on the shards directly (cache_latents=False), or encode them once (`sdjax-train "
                             "encode`) and read the latent shards (data.moments_ext=npy).")
        if self.tokenizer.from_captions and self.data.name == "webdataset":
            raise ValueError("tokenizer.from_captions reads every caption before training, which a webdataset stream "
                             "does not: set tokenizer.dir (a CLIP tokenizer folder) or tokenizer.words.")
        if self.train.cache_latents and (self.data.random_crop or self.data.random_flip):
            raise ValueError("train.cache_latents encodes each image once, so random crops and flips would be frozen "
                             "into the cache: set data.random_crop=False and data.random_flip=False, or turn caching "
                             "off.")
        if self.train.cache_text and not self.train.cache_latents:
            raise ValueError("train.cache_text keeps the text encoders' outputs in the latent cache: set "
                             "train.cache_latents=True too.")
        if self.train.cache_text and self.lora.rank and self.lora.text_encoders:
            raise ValueError("train.cache_text freezes the text encoders' outputs, but lora.text_encoders trains "
                             "adapters in them: turn one of them off.")
        if self.train.cache_latents and self.data.buckets:
            raise ValueError("train.cache_latents encodes every image at one size; data.buckets trains each at its "
                             "bucket's: turn one of them off.")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "LatentRunConfig":
        train = read_section(LatentTrainConfig, config.train, "train")
        model = config.get("model")
        model = ModelSource(
            pretrained=config.get("pretrained"), unet_from_pretrained=config.get("unet_from_pretrained", True),
            model=model.to_dict() if model is not None else {},
            autoencoder=read_section(AutoencoderSource, config.get("autoencoder"), "autoencoder"),
            text_encoder=read_section(TextEncoderSource, config.get("text_encoder"), "text_encoder"))
        return cls(train=train, data=_data(config, train.batch_size),
                   sample=read_section(SampleConfig, config.get("sample"), "sample"),
                   eval=read_section(EvalConfig, config.get("eval"), "eval"), model=model,
                   tokenizer=read_section(TokenizerConfig, config.get("tokenizer"), "tokenizer"),
                   lora=read_section(LoraConfig, config.get("lora"), "lora"), mesh=_mesh(config))


@dataclasses.dataclass(frozen=True)
class AutoencoderRunConfig:
    """The autoencoder phase's whole config, read once (``from_config``)."""
    train: AutoencoderTrainConfig
    data: Any  # sdjax.data.DataConfig, this host's
    model: dict[str, Any]  # the autoencoder's diffusers-style config
    discriminator: DiscriminatorConfig
    loss: LossConfig
    mesh: MeshConfig

    def __post_init__(self):
        if self.data.name == "webdataset":
            raise ValueError("The autoencoder phase evaluates on a held-out split, which webdataset shards do not "
                             "have: train it on an image folder or a TFDS dataset (data.name).")
        if self.data.buckets:
            raise ValueError("data.buckets is the latent phase's: the autoencoder trains on square crops of "
                             "data.image_size. Unset data.buckets for this phase.")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "AutoencoderRunConfig":
        train = read_section(AutoencoderTrainConfig, config.train, "train")
        return cls(train=train, data=_data(config, train.batch_size), model=config.model.to_dict(),
                   discriminator=read_section(DiscriminatorConfig, config.get("discriminator"), "discriminator"),
                   loss=read_section(LossConfig, config.get("loss"), "loss"), mesh=_mesh(config))
