"""CLIP's two towers for the CLIP score: an image tower (ViT) and the text tower with their projections.

Both towers are the text encoder's blocks (``text_encoder.CLIPEncoder``; the image tower's attend
over every token). Names follow transformers' ``CLIPModel`` (``vision_model/embeddings/patch_embedding``,
``vision_model/pre_layrnorm``, ``visual_projection``, ``text_projection``); open_clip's names map onto
them through one table (``sdjax.checkpoints.open_clip``). The default config is open_clip's ViT-H-14,
the model MLPerf scores with.
"""

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from sdjax.models import layers
from sdjax.models.text_encoder import CLIPEncoder, CLIPTextEncoder, TextEncoderConfig, pooled_output

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The image tower: a ViT over ``patch_size`` patches with a class token (the fields the blocks read
    are named as ``TextEncoderConfig``'s)."""
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_layers_used(self) -> int:
        return self.num_hidden_layers


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers and the shared embedding width."""
    vision: VisionConfig = VisionConfig()
    text: TextEncoderConfig = TextEncoderConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                num_attention_heads=16, hidden_act="gelu", projection_dim=1024)
    projection_dim: int = 1024

    @classmethod
    def from_open_clip(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        """From open_clip's model config (``model_configs/ViT-H-14.json``: ``embed_dim``, ``vision_cfg``,
        ``text_cfg``); GELU unless ``quick_gelu`` is set, as open_clip builds it."""
        v, t = d.get("vision_cfg", {}), d.get("text_cfg", {})
        unsupported = sorted(set(v) - {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
                             | set(t) - {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"})
        if unsupported or not isinstance(v.get("layers", 1), int):
            raise ValueError(f"open_clip config with {unsupported or 'a non-ViT image tower'}: sdjax scores with "
                             "ViT image towers and the plain text transformer (ViT-H-14, ViT-L-14, ViT-B-32 ...).")
        act = "quick_gelu" if d.get("quick_gelu") else "gelu"
        width, t_width = v.get("width", 768), t.get("width", 512)
        vision = VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
                              hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
                              num_hidden_layers=v.get("layers", 12),
                              num_attention_heads=width // v.get("head_width", 64), hidden_act=act)
        text = TextEncoderConfig(vocab_size=t.get("vocab_size", 49408), hidden_size=t_width,
                                 intermediate_size=int(t_width * t.get("mlp_ratio", 4.0)),
                                 num_hidden_layers=t.get("layers", 12), num_attention_heads=t.get("heads", 8),
                                 max_position_embeddings=t.get("context_length", 77), hidden_act=act,
                                 projection_dim=d.get("embed_dim", 512))
        return cls(vision=vision, text=text, projection_dim=d.get("embed_dim", 512))


class CLIPVisionEmbeddings(nn.Module):
    """Patches (a strided conv without bias), a class token in front, learned positions."""
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=p, use_bias=False, name="patch_embedding",
                          **kw)(pixels_BHWC.astype(self.dtype))
        B, gh, gw, D = patches.shape
        cls_D = self.param("class_embedding", nn.initializers.normal(0.02), (D,), self.param_dtype)
        position = nn.Embed(gh * gw + 1, D, name="position_embedding", **kw)
        tokens_BLD = jnp.concatenate([jnp.broadcast_to(cls_D.astype(self.dtype), (B, 1, D)),
                                      patches.reshape(B, gh * gw, D)], axis=1)
        return tokens_BLD + position(jnp.arange(gh * gw + 1))[None]


class CLIPVisionTransformer(nn.Module):
    """Normalised images (B, S, S, 3) -> the class token's output through ``post_layernorm`` (B, D)."""
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixels_BHWC.ndim != 4 or pixels_BHWC.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"CLIP's image tower takes (batch, {c.image_size}, {c.image_size}, 3) images, got "
                             f"{pixels_BHWC.shape}.")
        x_BLD = CLIPVisionEmbeddings(c, name="embeddings", **kw)(pixels_BHWC)
        x_BLD = layers.layer_norm(c.layer_norm_eps, name="pre_layrnorm", **kw)(x_BLD).astype(self.dtype)
        x_BLD = CLIPEncoder(c, causal=False, name="encoder", **kw)(x_BLD)[-1]
        return layers.layer_norm(c.layer_norm_eps, name="post_layernorm", **kw)(x_BLD[:, 0])


class CLIPModel(nn.Module):
    """``image_embeds(pixels)`` and ``text_embeds(ids)``: each tower's output projected to
    ``projection_dim`` and scaled to unit length, in f32; ``__call__`` gives both."""
    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_model = CLIPVisionTransformer(c.vision, **kw)
        self.text_model = CLIPTextEncoder(c.text, **kw)
        self.visual_projection = layers.dense(c.projection_dim, name="visual_projection", use_bias=False, **kw)
        self.text_projection = layers.dense(c.projection_dim, name="text_projection", use_bias=False, **kw)

    def image_embeds(self, pixels_BHWC: jax.Array) -> jax.Array:
        return _unit(self.visual_projection(self.vision_model(pixels_BHWC).astype(self.dtype)))

    def text_embeds(self, input_ids_BL: jax.Array) -> jax.Array:
        """The end-of-text token's state (open_clip's ``argmax`` pooling: the largest id in each row)."""
        hidden_BLD = self.text_model(input_ids_BL).context_BLD
        return _unit(self.text_projection(pooled_output(hidden_BLD, input_ids_BL, eos_token_id=2)))

    def __call__(self, pixels_BHWC: jax.Array, input_ids_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.image_embeds(pixels_BHWC), self.text_embeds(input_ids_BL)


def _unit(x_BE: jax.Array) -> jax.Array:
    """x / ||x|| in f32, as torch's ``F.normalize`` (norm floored at 1e-12)."""
    x_BE = x_BE.astype(jnp.float32)
    return x_BE / jnp.maximum(jnp.linalg.norm(x_BE, axis=-1, keepdims=True), 1e-12)
