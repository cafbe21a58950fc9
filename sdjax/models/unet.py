"""The Stable Diffusion denoiser: a UNet with ResNet blocks and cross-attention to the text.

Covers the SD 1.x, 2.x and SDXL shapes of diffusers' ``UNet2DConditionModel``; SDXL's is the same
network with more transformer layers per level and ``addition_embed_type="text_time"`` (the pooled
text embedding and the micro-conditioning numbers added to the timestep embedding). Attribute names
mirror diffusers (``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_q``) so that
``sdjax.checkpoints.convert.torch_to_flax(state_dict, params, what="unet")`` loads its
state dicts directly.
"""

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import flax.struct

from sdjax.models.layers import (Dtype, Downsample, ResnetBlock, Upsample, constrain_image, constrain_seq, conv,
                                 dense, group_norm)
from sdjax.models.transformer import SpatialTransformer

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys this UNet implements only at the listed values (the first is the default).
_FIXED_KEYS: dict[str, tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu", "swish"),
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0.0,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
# Keys that do not change the SD UNet built here: metadata, and options read only by
# block types or embeddings this UNet rejects above.
_IGNORED_KEYS = frozenset({"mid_block_only_cross_attention", "addition_embed_type_num_heads"})

IntOrTuple = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of diffusers' ``UNet2DConditionModel`` config.json that SD 1.x / 2.x use.

    Careful with diffusers' naming: when ``num_attention_heads`` is None, ``attention_head_dim``
    holds the number of *heads* per level (SD 1.x: 8; SD 2.x: (5, 10, 20, 20)), and the head
    width is channels / heads. ``num_attention_heads``, when set, takes precedence.
    ``upcast_attention`` is kept for the round trip: attention logits and softmax are always f32.
    """
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: IntOrTuple | None = None
    cross_attention_dim: int = 1280
    transformer_layers_per_block: IntOrTuple = 1
    only_cross_attention: bool | tuple[bool, ...] = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    upcast_attention: bool | None = False
    # SDXL: "text_time" adds MLP(pooled text embedding ++ sinusoidal embeddings of the micro-conditioning
    # numbers, addition_time_embed_dim wide each) to the timestep embedding; its input width is
    # projection_class_embeddings_input_dim.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNetConfig: addition_embed_type={self.addition_embed_type!r} is not supported; "
                             "sdjax implements None (SD 1/2) and 'text_time' (SDXL).")
        if self.addition_embed_type and not (self.addition_time_embed_dim
                                             and self.projection_class_embeddings_input_dim):
            raise ValueError("UNetConfig: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim.")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNetConfig: down_block_types {self.down_block_types}, up_block_types "
                             f"{self.up_block_types} and block_out_channels {self.block_out_channels} "
                             "must have one entry per level.")
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            bad = [t for t in getattr(self, name) if t not in allowed]
            if bad:
                raise ValueError(f"UNetConfig: unsupported {name} {bad}; supported: {allowed}.")
        for name in ("layers_per_block", "attention_head_dim", "num_attention_heads",
                     "transformer_layers_per_block", "only_cross_attention"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"UNetConfig: {name}={value} must be a single value or one per level ({n}).")
            if isinstance(value, tuple) and any(isinstance(v, (tuple, list)) for v in value):
                raise ValueError(f"UNetConfig: nested per-layer {name}={value} is not supported.")
        if not isinstance(self.cross_attention_dim, int):
            raise ValueError(f"UNetConfig: per-level cross_attention_dim={self.cross_attention_dim} is not "
                             "supported; every level attends to the same text context.")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"UNetConfig: norm_num_groups={self.norm_num_groups} is not supported; SD uses 32.")
        attention_levels = ({n - 1}
                            | {i for i, t in enumerate(self.down_block_types) if t.startswith("CrossAttn")}
                            | {n - 1 - i for i, t in enumerate(self.up_block_types) if t.startswith("CrossAttn")})
        for i, ch in enumerate(self.block_out_channels):
            if ch % self.norm_num_groups:
                raise ValueError(f"UNetConfig: block_out_channels[{i}]={ch} is not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}.")
            if i in attention_levels and ch % self.heads[i]:
                raise ValueError(f"UNetConfig: block_out_channels[{i}]={ch} is not divisible by its "
                                 f"{self.heads[i]} attention heads.")

    def per_level(self, name: str) -> tuple:
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level (diffusers' ``num_attention_heads or attention_head_dim``)."""
        return self.per_level("attention_head_dim" if self.num_attention_heads is None else "num_attention_heads")

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Build from a diffusers UNet config.json dict; raises ValueError on features not implemented."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, problems = {}, []
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in fields:
                kwargs[key] = _tupled(value)
            elif key in _FIXED_KEYS:
                if value not in _FIXED_KEYS[key]:
                    problems.append(f"{key}={value!r} (supported: {_FIXED_KEYS[key][0]!r})")
            else:
                problems.append(f"unknown key {key}={value!r}")
        if problems:
            raise ValueError("UNet config uses features sdjax's UNet does not implement: " + "; ".join(problems)
                             + ". Only SD 1.x / 2.x / SDXL style UNet2DConditionModel configs are supported.")
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict:
        """A config.json dict that diffusers' ``UNet2DConditionModel(**d)`` builds into the same network.

        Heads are written as ``attention_head_dim`` (diffusers' meaning) since diffusers refuses
        ``num_attention_heads`` for this class.
        """
        d = {k: _listed(v) for k, v in dataclasses.asdict(self).items()}
        d["attention_head_dim"] = _listed(self.heads if self.num_attention_heads is not None
                                          else self.attention_head_dim)
        d["num_attention_heads"] = None
        d.update({k: v[0] for k, v in _FIXED_KEYS.items()})
        return {"_class_name": "UNet2DConditionModel", **d}


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _listed(value: Any) -> Any:
    return [_listed(v) for v in value] if isinstance(value, tuple) else value


def timestep_embedding(t_B: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, in f32, as diffusers' ``Timesteps``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args_BH = t_B.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args_BH), jnp.cos(args_BH)
    emb_BD = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb_BD, ((0, 0), (0, dim % 2)))


@flax.struct.dataclass
class AddedCond:
    """SDXL's added conditioning (diffusers' ``added_cond_kwargs``): the pooled, projected text
    embedding and the micro-conditioning numbers (base: original size, crop top-left, target size;
    refiner: original size, crop top-left, aesthetic score)."""
    text_embeds_BP: jax.Array
    time_ids_BK: jax.Array


class TimestepEmbedding(nn.Module):
    """Two-layer SiLU MLP on the sinusoidal embedding (``linear_1``, ``linear_2``)."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb_BD: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(dense(self.features, name="linear_1", **kw)(emb_BD))
        return dense(self.features, name="linear_2", **kw)(h)


class _BlockBase(nn.Module):
    """What every UNet stage needs to build its ResNet and transformer layers."""
    config: UNetConfig
    level: int
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "xla"

    def resnet(self, name: str) -> nn.Module:
        cls = nn.remat(ResnetBlock) if self.remat else ResnetBlock
        return cls(self.config.block_out_channels[self.level], groups=self.config.norm_num_groups,
                   eps=self.config.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def transformer(self, name: str, only_cross_attention: bool) -> nn.Module:
        c, i = self.config, self.level
        cls = nn.remat(SpatialTransformer) if self.remat else SpatialTransformer
        heads = c.heads[i]
        return cls(heads, c.block_out_channels[i] // heads,
                   num_layers=c.per_level("transformer_layers_per_block")[i],
                   groups=c.norm_num_groups, use_linear_projection=c.use_linear_projection,
                   only_cross_attention=only_cross_attention, attention=self.attention,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class DownBlock(_BlockBase):
    """diffusers' ``CrossAttnDownBlock2D`` (``has_attention``) or ``DownBlock2D``: ResNet
    (+ transformer) layers, then a stride-2 conv except at the last level. Returns the output
    and every intermediate activation for the skip connections."""
    has_attention: bool = True
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, temb_BD: jax.Array, ctx_BSD: jax.Array
                 ) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j in range(self.config.per_level("layers_per_block")[self.level]):
            x_BHWC = self.resnet(f"resnets_{j}")(x_BHWC, temb_BD)
            if self.has_attention:
                x_BHWC = self.transformer(f"attentions_{j}", self.only_cross_attention)(x_BHWC, ctx_BSD)
            skips.append(x_BHWC)
        if self.add_downsample:
            x_BHWC = Downsample(self.config.block_out_channels[self.level], dtype=self.dtype,
                                param_dtype=self.param_dtype, name="downsamplers_0")(x_BHWC)
            x_BHWC = constrain_image(x_BHWC)
            skips.append(x_BHWC)
        return x_BHWC, skips


class MidBlock(_BlockBase):
    """diffusers' ``UNetMidBlock2DCrossAttn``: ResNet, transformer, ResNet at the lowest resolution."""

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, temb_BD: jax.Array, ctx_BSD: jax.Array) -> jax.Array:
        x_BHWC = self.resnet("resnets_0")(x_BHWC, temb_BD)
        x_BHWC = self.transformer("attentions_0", only_cross_attention=False)(x_BHWC, ctx_BSD)
        return self.resnet("resnets_1")(x_BHWC, temb_BD)


class UpBlock(_BlockBase):
    """diffusers' ``CrossAttnUpBlock2D`` (``has_attention``) or ``UpBlock2D``: each layer takes
    the last remaining skip activation (concatenated on channels), then an x2 upsample except
    at the last level."""
    has_attention: bool = True
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, skips: Sequence[jax.Array], temb_BD: jax.Array, ctx_BSD: jax.Array
                 ) -> jax.Array:
        skips = list(skips)
        for j in range(len(skips)):
            x_BHWC = jnp.concatenate([x_BHWC, skips.pop()], axis=-1)
            x_BHWC = self.resnet(f"resnets_{j}")(x_BHWC, temb_BD)
            if self.has_attention:
                x_BHWC = self.transformer(f"attentions_{j}", self.only_cross_attention)(x_BHWC, ctx_BSD)
        if self.add_upsample:
            x_BHWC = Upsample(self.config.block_out_channels[self.level], dtype=self.dtype,
                              param_dtype=self.param_dtype, name="upsamplers_0")(x_BHWC)
            x_BHWC = constrain_image(x_BHWC)
        return x_BHWC


class UNet(nn.Module):
    """Predicts noise (or v) from noisy latents, timesteps and text context.

    ``remat`` recomputes each ResnetBlock / SpatialTransformer in the backward pass to save
    training memory; parameter names are the same either way. ``attention`` picks the attention
    implementation (``layers.attention``; resolve "auto" with ``layers.resolve_attention``).
    """
    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, timesteps_B: jax.Array | float, ctx_BLD: jax.Array,
                 added: AddedCond | None = None) -> jax.Array:
        c = self.config
        n = len(c.block_out_channels)
        B, H, W, _ = x_BHWC.shape
        factor = 2 ** (n - 1)
        if H % factor or W % factor:
            raise ValueError(f"UNet: latent size {H}x{W} must be divisible by {factor} "
                             f"({n} levels, {n - 1} downsamplings).")
        if ctx_BLD.shape[-1] != c.cross_attention_dim:
            raise ValueError(f"UNet: text context has width {ctx_BLD.shape[-1]}, the config's "
                             f"cross_attention_dim is {c.cross_attention_dim}; use the matching text encoder.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blk = dict(config=c, remat=self.remat, attention=self.attention, **kw)

        t_B = jnp.broadcast_to(jnp.asarray(timesteps_B, jnp.float32), (B,))
        t_emb = timestep_embedding(t_B, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb_BD = TimestepEmbedding(4 * c.block_out_channels[0], name="time_embedding", **kw)(t_emb)
        if c.addition_embed_type:
            temb_BD = temb_BD + self.text_time_embedding(added, B)
        ctx_BLD = constrain_seq(ctx_BLD)

        x_BHWC = constrain_image(conv(c.block_out_channels[0], 3, name="conv_in", **kw)(x_BHWC))
        skips = [x_BHWC]
        only_cross = c.per_level("only_cross_attention")
        for i, kind in enumerate(c.down_block_types):
            x_BHWC, s = DownBlock(level=i, has_attention=kind == "CrossAttnDownBlock2D", add_downsample=i < n - 1,
                                  only_cross_attention=only_cross[i],
                                  name=f"down_blocks_{i}", **blk)(x_BHWC, temb_BD, ctx_BLD)
            skips += s

        x_BHWC = MidBlock(level=n - 1, name="mid_block", **blk)(x_BHWC, temb_BD, ctx_BLD)

        layers = c.per_level("layers_per_block")
        for i, kind in enumerate(c.up_block_types):
            level = n - 1 - i
            take = layers[level] + 1
            x_BHWC = UpBlock(level=level, has_attention=kind == "CrossAttnUpBlock2D", add_upsample=i < n - 1,
                             only_cross_attention=only_cross[level],
                             name=f"up_blocks_{i}", **blk)(x_BHWC, skips[-take:], temb_BD, ctx_BLD)
            skips = skips[:-take]

        x_BHWC = group_norm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(x_BHWC)
        return conv(c.out_channels, 3, name="conv_out", **kw)(nn.silu(x_BHWC))

    def text_time_embedding(self, added: AddedCond | None, batch: int) -> jax.Array:
        """``add_embedding``(pooled text ++ sinusoidal embeddings of each micro-conditioning number)."""
        c = self.config
        if added is None:
            raise ValueError("UNet: this SDXL UNet (addition_embed_type='text_time') needs `added`: the pooled "
                             "text embedding and the micro-conditioning numbers (sdjax.models.unet.AddedCond).")
        text_BP, ids_BK = added.text_embeds_BP, added.time_ids_BK
        width = text_BP.shape[-1] + ids_BK.shape[-1] * c.addition_time_embed_dim
        if width != c.projection_class_embeddings_input_dim:
            raise ValueError(f"UNet: pooled text width {text_BP.shape[-1]} + {ids_BK.shape[-1]} micro-conditioning "
                             f"numbers x {c.addition_time_embed_dim} = {width}, but the config's "
                             f"projection_class_embeddings_input_dim is {c.projection_class_embeddings_input_dim}: "
                             "use the matching second text encoder (base: 6 numbers; refiner: 5).")
        ids = jnp.broadcast_to(ids_BK, (batch, ids_BK.shape[-1])).reshape(-1)
        time_BE = timestep_embedding(ids, c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
        add_BP = jnp.concatenate([jnp.broadcast_to(text_BP, (batch, text_BP.shape[-1])).astype(jnp.float32),
                                  time_BE.reshape(batch, -1)], axis=-1)
        return TimestepEmbedding(4 * c.block_out_channels[0], name="add_embedding", dtype=self.dtype,
                                 param_dtype=self.param_dtype)(add_BP.astype(self.dtype))
