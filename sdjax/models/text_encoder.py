"""CLIP text encoder (transformers' ``CLIPTextModel.text_model``) conditioning the UNet.

Parameter names mirror transformers (``embeddings/token_embedding``,
``encoder/layers_3/self_attn/q_proj``, ``final_layer_norm``) so that
``sdjax.checkpoints.convert`` maps a PyTorch state dict onto them.

SD 1.x conditions on the last layer of OpenAI's CLIP ViT-L/14 text tower; SD 2.x on the
penultimate layer of OpenCLIP ViT-H/14. Both go through the final LayerNorm. diffusers
stores SD 2's encoder with the last layer dropped (23 layers, last hidden state), which
is the same network: ``output_layer="penultimate"`` builds only the layers it uses.
SDXL conditions on the penultimate layer's output as it is, without the final LayerNorm
(``output_layer="penultimate_hidden"``, diffusers' ``hidden_states[-2]``) of both its encoders, and on
the pooled output of the second, OpenCLIP ViT-bigG/14 (transformers' ``CLIPTextModelWithProjection``:
``with_projection``), for which every layer is built.
With no layers at all (``num_hidden_layers=0``, as transformers allows) each token's output is
its word and position embedding through the final LayerNorm, whatever the other words are.
"""

import dataclasses
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn
import flax.struct

from sdjax.models import layers

Dtype = Any

OUTPUT_LAYERS = ("last", "penultimate", "penultimate_hidden")
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """transformers' ``CLIPTextConfig`` fields, plus which layer's output conditions the UNet."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    output_layer: Literal["last", "penultimate", "penultimate_hidden"] = "last"
    with_projection: bool = False  # CLIPTextModelWithProjection: the pooled output through text_projection

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"TextEncoderConfig.hidden_act={self.hidden_act!r} is not supported; "
                             f"use one of {sorted(ACTIVATIONS)}.")
        if self.output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"TextEncoderConfig.output_layer={self.output_layer!r}; use one of {OUTPUT_LAYERS}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"TextEncoderConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}.")
        if self.output_layer != "last" and self.num_hidden_layers < 1:
            raise ValueError(f"TextEncoderConfig: output_layer={self.output_layer!r} needs at least 1 layer, "
                             f"got num_hidden_layers={self.num_hidden_layers}.")

    @property
    def num_layers_used(self) -> int:
        """Transformer layers the encoder builds and runs."""
        return self.num_hidden_layers - (self.output_layer == "penultimate")

    @classmethod
    def from_transformers_config(cls, d: Mapping[str, Any], **overrides: Any) -> "TextEncoderConfig":
        """From a ``CLIPTextConfig`` dict (a diffusers ``text_encoder/config.json``; its ``architectures``
        says whether the model has a projection); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.setdefault("with_projection", "CLIPTextModelWithProjection" in (d.get("architectures") or ()))
        return cls(**{**kwargs, **overrides})

    def to_transformers_config(self) -> dict:
        """A ``CLIPTextConfig`` dict for the network these parameters describe.

        A penultimate-layer encoder becomes, as in diffusers' SD 2, one with
        ``num_layers_used`` layers whose last hidden state is the same output.
        """
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("output_layer", "with_projection")}
        d["num_hidden_layers"] = self.num_layers_used
        d["model_type"] = "clip_text_model"
        d["architectures"] = ["CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"]
        return d


class CLIPTextEmbeddings(nn.Module):
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids_BL: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(0.02)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        token = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding",
                         embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")), **kw)
        position = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding",
                            embedding_init=nn.with_logical_partitioning(init, (None, "embed")), **kw)
        L = input_ids_BL.shape[1]
        return token(input_ids_BL) + position(jnp.arange(L))[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention named as transformers' (q_proj, k_proj, v_proj, out_proj); causal for
    text, over every token for CLIP's image tower."""
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        c = self.config
        B, L, D = x_BLD.shape
        N = c.num_attention_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q_BLNH = layers.dense(D, name="q_proj", **kw)(x_BLD).reshape(B, L, N, D // N)
        k_BLNH = layers.dense(D, name="k_proj", **kw)(x_BLD).reshape(B, L, N, D // N)
        v_BLNH = layers.dense(D, name="v_proj", **kw)(x_BLD).reshape(B, L, N, D // N)
        out_BLNH = layers.attention(q_BLNH, k_BLNH, v_BLNH, is_causal=self.causal)
        return layers.dense(D, name="out_proj", **kw)(out_BLNH.reshape(B, L, D))


class CLIPMLP(nn.Module):
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h_BLF = ACTIVATIONS[c.hidden_act](layers.dense(c.intermediate_size, name="fc1", **kw)(x_BLD))
        return layers.dense(c.hidden_size, name="fc2", **kw)(h_BLF)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.layer_norm(c.layer_norm_eps, name="layer_norm1", **kw)(x_BLD).astype(self.dtype)
        x_BLD = layers.constrain_seq(x_BLD + CLIPAttention(c, name="self_attn", causal=self.causal, **kw)(h))
        h = layers.layer_norm(c.layer_norm_eps, name="layer_norm2", **kw)(x_BLD).astype(self.dtype)
        return layers.constrain_seq(x_BLD + CLIPMLP(c, name="mlp", **kw)(h))


class CLIPEncoder(nn.Module):
    """The stack of blocks; ``config`` is a text config or any with the same fields (the image tower's).
    Returns the input and every block's output, as transformers' ``hidden_states``."""
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> tuple[jax.Array, ...]:
        hidden = [x_BLD]
        for i in range(self.config.num_layers_used):
            hidden.append(CLIPEncoderLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                           causal=self.causal, name=f"layers_{i}")(hidden[-1]))
        return tuple(hidden)


@flax.struct.dataclass
class TextEncoding:
    """What the text encoder gives the UNet: the per-token context (B, L, D) its cross-attention reads,
    and the pooled embedding (B, P): the end-of-text token's final state, through ``text_projection``
    for a ``with_projection`` encoder (SDXL's added conditioning)."""
    context_BLD: jax.Array
    pooled_BP: jax.Array


class CLIPTextEncoder(nn.Module):
    """Token ids (B, L) -> ``TextEncoding``: the UNet's cross-attention context and the pooled embedding."""
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids_BL: jax.Array, clip_skip: int = 0) -> TextEncoding:
        """``clip_skip`` (a Python int): the context from that many layers before the configured one,
        as diffusers' pipelines count it (through the final LayerNorm unless the configured output is
        ``penultimate_hidden``, SDXL's); the pooled embedding stays the last layer's."""
        c = self.config
        if input_ids_BL.ndim != 2 or input_ids_BL.shape[1] > c.max_position_embeddings:
            raise ValueError(f"CLIPTextEncoder expects token ids of shape (batch, length <= "
                             f"{c.max_position_embeddings}), got {input_ids_BL.shape}.")
        hidden_output = c.output_layer == "penultimate_hidden"
        if not isinstance(clip_skip, int) or not 0 <= clip_skip <= c.num_layers_used - hidden_output:
            raise ValueError(f"clip_skip must be an int in [0, {c.num_layers_used - hidden_output}] for this "
                             f"{c.num_layers_used}-layer text encoder, got {clip_skip!r}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_BLD = layers.constrain_seq(CLIPTextEmbeddings(c, name="embeddings", **kw)(input_ids_BL))
        hidden = CLIPEncoder(c, name="encoder", **kw)(x_BLD)
        final_norm = layers.layer_norm(c.layer_norm_eps, name="final_layer_norm", **kw)
        final_BLD = final_norm(hidden[-1]).astype(self.dtype)
        pooled_BD = pooled_output(final_BLD, input_ids_BL, c.eos_token_id)
        if c.with_projection:
            pooled_BD = layers.dense(c.projection_dim, name="text_projection", use_bias=False, **kw)(pooled_BD)
        if hidden_output:
            context_BLD = hidden[-2 - clip_skip].astype(self.dtype)
        else:
            context_BLD = final_BLD if clip_skip == 0 else final_norm(hidden[-1 - clip_skip]).astype(self.dtype)
        return TextEncoding(layers.constrain_seq(context_BLD), pooled_BD)


def pooled_output(hidden_BLD: jax.Array, input_ids_BL: jax.Array, eos_token_id: int) -> jax.Array:
    """The hidden state at each sequence's end-of-text token, as transformers' ``pooler_output``.

    Configs saved before transformers fixed ``eos_token_id`` (value 2) pick the largest id,
    which is end-of-text in CLIP's vocabulary.
    """
    if eos_token_id == 2:
        idx_B = jnp.argmax(input_ids_BL, axis=-1)
    else:
        idx_B = jnp.argmax(input_ids_BL == eos_token_id, axis=-1)
    return jnp.take_along_axis(hidden_BLD, idx_B[:, None, None], axis=1)[:, 0]
