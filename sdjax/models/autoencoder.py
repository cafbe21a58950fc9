"""The KL autoencoder of Stable Diffusion (kl-f8 VAE), named as diffusers' ``AutoencoderKL``.

Images in [-1, 1], NHWC, map to a diagonal Gaussian over latents with
``latent_channels`` channels and ``downsample_factor`` times smaller height and width.
Module attribute names follow diffusers' state dict (``encoder.down_blocks.0.resnets.1``
-> ``encoder/down_blocks_0/resnets_1``), so ``checkpoints.convert.torch_to_flax`` loads
diffusers weights directly. Latents are returned unscaled: multiply by
``config.scaling_factor`` before diffusion, as diffusers' pipelines do.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from sdjax.models.layers import Attention, Downsample, ResnetBlock, Upsample, conv, constrain_image, group_norm

Dtype = Any

EPS = 1e-6  # every norm of the autoencoder
LOGVAR_RANGE = (-30.0, 20.0)  # clipping of the posterior's log-variance, as in the originals

DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Fields of diffusers' ``AutoencoderKL`` config.json; defaults are SD 1.x/2.x kl-f8.

    The block types are implied (every down block is ``DownEncoderBlock2D``, every up
    block ``UpDecoderBlock2D``, the only kinds this module implements), so they are
    checked on the way in and written on the way out rather than stored.
    """
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("AutoencoderConfig.block_out_channels is empty; give one width per resolution level.")
        if self.layers_per_block < 1:
            raise ValueError(f"AutoencoderConfig.layers_per_block must be >= 1, got {self.layers_per_block}.")
        if self.act_fn != "silu":
            raise ValueError(f"AutoencoderConfig.act_fn={self.act_fn!r} is not supported; only 'silu' is.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"AutoencoderConfig: block_out_channels {bad} are not divisible by "
                             f"norm_num_groups={self.norm_num_groups}; pick widths that are multiples of it.")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "AutoencoderConfig":
        """Build from a diffusers ``AutoencoderKL`` config.json dict; keys this class does not
        know (``_class_name``, ``_diffusers_version``, ...) are ignored."""
        levels = len(d.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", DOWN_BLOCK_TYPE), ("up_block_types", UP_BLOCK_TYPE)):
            types = list(d.get(key, [want] * levels))
            if len(types) != levels or any(t != want for t in types):
                raise ValueError(f"AutoencoderKL config: {key}={types} is not supported; this autoencoder "
                                 f"implements {levels} x {want!r} (one per entry of block_out_channels).")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict:
        d = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        levels = len(self.block_out_channels)
        d["down_block_types"] = [DOWN_BLOCK_TYPE] * levels
        d["up_block_types"] = [UP_BLOCK_TYPE] * levels
        return d


@struct.dataclass
class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over NHWC latents; build with ``from_moments``."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments_BhwC2: jax.Array) -> "DiagonalGaussian":
        """Split the encoder output into mean and log-variance (channel halves), in f32, with
        the log-variance clipped to [-30, 20]."""
        mean, logvar = jnp.split(moments_BhwC2.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def latent_scale(self, key: jax.Array) -> jax.Array:
        """1 / std of a sample of these latents: LDM's ``scale_by_std`` latent scale."""
        return 1.0 / jnp.std(self.sample(key))

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """Per-example KL(self || other), other = N(0, I) by default, summed over H, W, C."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var
                     - 1.0 - self.logvar + other.logvar)
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

    def nll(self, x_BhwC: jax.Array) -> jax.Array:
        """Per-example negative log-likelihood of ``x_BhwC``, summed over H, W, C."""
        terms = jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(x_BhwC - self.mean) / self.var
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


class MidAttention(Attention):
    """diffusers' VAE attention block: GroupNorm, one head over all H*W positions, residual."""
    groups: int = 32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        h = group_norm(self.groups, EPS, name="group_norm", dtype=self.dtype, param_dtype=self.param_dtype)(x_BHWC)
        h_BLD = super().__call__(h.reshape(B, H * W, C))
        return constrain_image(x_BHWC + h_BLD.reshape(B, H, W, C).astype(x_BHWC.dtype))


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` without time embedding: resnet, attention, resnet."""
    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ResnetBlock(self.channels, self.groups, EPS, name="resnets_0", **kw)(x_BHWC)
        if self.add_attention:
            h = MidAttention(heads=1, head_dim=self.channels, out_features=self.channels, qkv_bias=True,
                             groups=self.groups, name="attentions_0", **kw)(h)
        return ResnetBlock(self.channels, self.groups, EPS, name="resnets_1", **kw)(h)


class DownEncoderBlock(nn.Module):
    """``layers`` resnets, then an asymmetric-padded stride-2 conv unless it is the last level."""
    out_channels: int
    layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.layers):
            x_BHWC = ResnetBlock(self.out_channels, self.groups, EPS, name=f"resnets_{j}", **kw)(x_BHWC)
        if self.add_downsample:
            x_BHWC = Downsample(self.out_channels, pad_asymmetric=True, name="downsamplers_0", **kw)(x_BHWC)
        return constrain_image(x_BHWC)


class UpDecoderBlock(nn.Module):
    """``layers`` resnets, then nearest x2 upsampling and a conv unless it is the last level."""
    out_channels: int
    layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.layers):
            x_BHWC = ResnetBlock(self.out_channels, self.groups, EPS, name=f"resnets_{j}", **kw)(x_BHWC)
        if self.add_upsample:
            x_BHWC = Upsample(self.out_channels, name="upsamplers_0", **kw)(x_BHWC)
        return constrain_image(x_BHWC)


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""
    config: AutoencoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x_BHWC)
        last = len(cfg.block_out_channels) - 1
        for i, ch in enumerate(cfg.block_out_channels):
            h = DownEncoderBlock(ch, cfg.layers_per_block, cfg.norm_num_groups, add_downsample=i < last,
                                 name=f"down_blocks_{i}", **kw)(h)
        h = MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention,
                     name="mid_block", **kw)(h)
        h = group_norm(cfg.norm_num_groups, EPS, name="conv_norm_out", **kw)(h)
        return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(nn.silu(h))


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""
    config: AutoencoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z_BhwC: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = cfg.block_out_channels[::-1]
        h = conv(widths[0], 3, name="conv_in", **kw)(z_BhwC)
        h = MidBlock(widths[0], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(h)
        last = len(widths) - 1
        for i, ch in enumerate(widths):
            h = UpDecoderBlock(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, add_upsample=i < last,
                               name=f"up_blocks_{i}", **kw)(h)
        h = group_norm(cfg.norm_num_groups, EPS, name="conv_norm_out", **kw)(h)
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(nn.silu(h))


class AutoencoderKL(nn.Module):
    """Encoder + 1x1 quant_conv to a DiagonalGaussian; 1x1 post_quant_conv + Decoder back.

    ``__call__`` reconstructs (sampling the posterior when given a key, its mode otherwise)
    and serves ``init``; use ``method=AutoencoderKL.encode`` / ``decode`` otherwise.
    """
    config: AutoencoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.quant_conv = (conv(2 * cfg.latent_channels, 1, name="quant_conv", **kw)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (conv(cfg.latent_channels, 1, name="post_quant_conv", **kw)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x_BHWC: jax.Array) -> DiagonalGaussian:
        _check_input("encode", x_BHWC, self.config.in_channels, "in_channels")
        moments = self.encoder(x_BHWC)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z_BhwC: jax.Array) -> jax.Array:
        _check_input("decode", z_BhwC, self.config.latent_channels, "latent_channels")
        if self.post_quant_conv is not None:
            z_BhwC = self.post_quant_conv(z_BhwC)
        return self.decoder(z_BhwC)

    def __call__(self, x_BHWC: jax.Array, key: jax.Array | None = None) -> jax.Array:
        posterior = self.encode(x_BHWC)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z)


def _check_input(method: str, x: jax.Array, channels: int, field: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"AutoencoderKL.{method} expects NHWC input with {channels} channels "
                         f"(config.{field}), got shape {tuple(x.shape)}.")
