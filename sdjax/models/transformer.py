"""The UNet's spatial transformer: image tokens attend to themselves and to the text context.

Named as diffusers' ``Transformer2DModel`` / ``BasicTransformerBlock`` / ``FeedForward`` so
that state dicts map onto these modules one to one.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn

from sdjax.models.layers import (Attention, Dtype, conv, constrain_image, constrain_seq, dense, group_norm,
                                 layer_norm)


class GEGLU(nn.Module):
    """Gated GELU (exact erf form): ``a * gelu(b)`` where ``[a, b] = proj(x)``."""
    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        h = dense(2 * self.inner_dim, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x_BLD)
        a, gate = jnp.split(h, 2, axis=-1)
        return a * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU MLP with a 4x hidden width (``net_0`` = GEGLU, ``net_2`` = output projection)."""
    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.dim * self.mult, name="net_0", **kw)(x_BLD)
        return dense(self.dim, name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the context, GEGLU MLP.

    With ``only_cross_attention`` the first attention also attends to the context.
    """
    dim: int
    heads: int
    head_dim: int
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"  # layers.attention's implementation

    @nn.compact
    def __call__(self, x_BLD: jax.Array, ctx_BSD: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_kw = dict(kw, implementation=self.attention)

        def norm(name: str, x: jax.Array) -> jax.Array:
            return layer_norm(1e-5, name=name, **kw)(x).astype(self.dtype)

        h = norm("norm1", x_BLD)
        h = Attention(self.heads, self.head_dim, self.dim, name="attn1", **attn_kw)(
            h, ctx_BSD if self.only_cross_attention else None)
        x_BLD = constrain_seq(x_BLD + h)
        h = Attention(self.heads, self.head_dim, self.dim, name="attn2", **attn_kw)(norm("norm2", x_BLD), ctx_BSD)
        x_BLD = constrain_seq(x_BLD + h)
        h = FeedForward(self.dim, name="ff", **kw)(norm("norm3", x_BLD))
        return constrain_seq(x_BLD + h)


class SpatialTransformer(nn.Module):
    """diffusers' ``Transformer2DModel`` for continuous inputs: GroupNorm (eps 1e-6), project in
    (1x1 conv, or linear with ``use_linear_projection``), transformer blocks over the H*W tokens,
    project out, add the input back."""
    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "xla"  # layers.attention's implementation

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, ctx_BSD: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        B, H, W, C = x_BHWC.shape
        inner = self.heads * self.head_dim
        h = group_norm(self.groups, 1e-6, name="norm", **kw)(x_BHWC)
        if self.use_linear_projection:
            h_BLD = dense(inner, name="proj_in", **kw)(h.reshape(B, H * W, C))
        else:
            h_BLD = conv(inner, 1, name="proj_in", **kw)(h).reshape(B, H * W, inner)
        h_BLD = constrain_seq(h_BLD)
        for k in range(self.num_layers):
            h_BLD = BasicTransformerBlock(inner, self.heads, self.head_dim, self.only_cross_attention,
                                          attention=self.attention, name=f"transformer_blocks_{k}",
                                          **kw)(h_BLD, ctx_BSD)
        if self.use_linear_projection:
            h = dense(C, name="proj_out", **kw)(h_BLD).reshape(B, H, W, C)
        else:
            h = conv(C, 1, name="proj_out", **kw)(h_BLD.reshape(B, H, W, inner))
        return constrain_image(h + x_BHWC)
