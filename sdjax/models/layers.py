"""Building blocks shared by the autoencoder and the UNet.

Attribute names mirror the PyTorch originals (diffusers), with list indices joined
by an underscore (``to_out.0`` -> ``to_out_0``), so that one generic converter maps
state dicts onto these modules. Parameters carry logical axis names; activations
get logical constraints; neither mentions mesh axes.
"""

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.sharding import PartitionSpec as P

Dtype = Any

# Logical axis names used by parameters and activations; configs map them to mesh axes.
CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
DENSE_KERNEL_AXES = ("dense_in", "dense_out")
IMAGE_AXES = ("batch", "height", "width", "channels")
SEQ_AXES = ("batch", "length", "embed")


def constrain_image(x_BHWC: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x_BHWC, IMAGE_AXES)


def constrain_seq(x_BLD: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x_BLD, SEQ_AXES)


def dense(features: int, *, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True,
          kernel_init=nn.initializers.lecun_normal()) -> nn.Dense:
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, DENSE_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("dense_out",)),
    )


# On CPU, a convolution whose input is hardly larger than its kernel (the UNet's 2x2 and 4x4 levels
# at small resolutions) runs as one matmul over the shifted copies of the input (im2col): always up
# to 4 positions per image, and up to 16 with >= 256 input channels, where XLA:CPU's generic loop is
# slower (the measurements: python -m benchmarks.conv_shapes, docs/benchmarks.md).
IM2COL_MAX_POSITIONS = 4  # positions per image (H x W) up to which im2col is always used on CPU
IM2COL_WIDE_MAX_POSITIONS, IM2COL_WIDE_MIN_CHANNELS = 16, 256  # and up to 16 for >= 256 input channels


def _use_im2col(lhs_shape, rhs_shape) -> bool:
    positions, channels = lhs_shape[1] * lhs_shape[2], lhs_shape[3]
    return rhs_shape[0] * rhs_shape[1] > 1 and (
        positions <= IM2COL_MAX_POSITIONS
        or (positions <= IM2COL_WIDE_MAX_POSITIONS and channels >= IM2COL_WIDE_MIN_CHANNELS))


def _im2col_conv(lhs, rhs, window_strides, padding, precision=None):
    """NHWC x HWIO convolution as one matmul over the stacked kernel taps (im2col)."""
    (kh, kw), (sh, sw) = rhs.shape[:2], window_strides
    x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    taps = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    cols = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
    return jnp.einsum("bhwk,ko->bhwo", cols, rhs.reshape(-1, rhs.shape[-1]), precision=precision)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` for ``nn.Conv``, with the im2col form on CPU for small NHWC inputs."""
    xla = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision)
    plain = (feature_group_count == 1 and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and not isinstance(padding, str) and lhs.ndim == 4
             and tuple(dimension_numbers) == tuple(jax.lax.conv_dimension_numbers(
                 lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))))
    if not plain or not _use_im2col(lhs.shape, rhs.shape):
        return xla(lhs, rhs)
    im2col = lambda x, w: _im2col_conv(x, w, window_strides, padding, precision)  # noqa: E731
    return jax.lax.platform_dependent(lhs, rhs, cpu=im2col, default=xla)


def conv(features: int, kernel: int = 3, *, name: str, dtype: Dtype, param_dtype: Dtype,
         stride: int = 1, padding: Any = "SAME", kernel_init=nn.initializers.lecun_normal()) -> nn.Conv:
    if padding == "SAME" and kernel > 1:
        padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=padding,
        dtype=dtype, param_dtype=param_dtype, name=name, conv_general_dilated=conv_general_dilated,
        kernel_init=nn.with_logical_partitioning(kernel_init, CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    )


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are computed in f32; returns ``out_dtype``."""
    out_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.float32)).astype(self.out_dtype)


def group_norm(num_groups: int, epsilon: float, *, name: str, dtype: Dtype, param_dtype: Dtype) -> GroupNorm:
    """A model computing in f32 gets the variance as the mean of squared deviations (two passes over
    x): in a nearly flat group (a plain background) E[x^2] - E[x]^2 cancels, and the division by the
    standard deviation magnifies the rounding left over. In bf16 or f16 the input's own rounding
    dwarfs that, and the one-pass E[x^2] - E[x]^2 spares the accelerator a read of x."""
    return GroupNorm(
        num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype,
        out_dtype=dtype, name=name, use_fast_variance=jnp.dtype(dtype).itemsize < 4,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
    )


def layer_norm(epsilon: float, *, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm computing in f32; callers cast the result back to their dtype."""
    return nn.LayerNorm(
        epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
    )


ATTENTION = ("auto", "xla", "flash", "cudnn")
FLASH_MIN_TOKENS = 512  # shorter self-attention (and all cross-attention) stays on XLA's path


def resolve_attention(implementation: str, platform: str, dtype) -> str:
    """``auto`` -> the fused attention of the platform the program is compiled for: Pallas flash
    attention on TPU, cuDNN on GPU (half precision only), XLA's einsums elsewhere."""
    if implementation not in ATTENTION:
        raise ValueError(f"attention={implementation!r}; use one of {', '.join(ATTENTION)}.")
    if implementation != "auto":
        return implementation
    if platform == "tpu":
        return "flash"
    if platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attention(q_BLNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, *, is_causal: bool = False,
              implementation: str = "xla") -> jax.Array:
    """softmax(QK^T / sqrt(d)) V with logits and softmax in f32.

    ``implementation``: "xla" (einsums with the heads folded into the batch, below), "flash" (jax's
    Pallas TPU flash-attention kernel: the logits never reach HBM; used for self-attention of at
    least ``FLASH_MIN_TOKENS`` tokens, XLA's path otherwise) or "cudnn" (``jax.nn.dot_product_attention``
    on GPU). Resolve "auto" with ``resolve_attention`` where the target devices are known.
    """
    if implementation == "flash" and _flash_fits(q_BLNH.shape[1], k_BSNH.shape[1]):
        return _flash_attention(q_BLNH, k_BSNH, v_BSNH, is_causal)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q_BLNH, k_BSNH, v_BSNH, is_causal=is_causal, implementation="cudnn")
    return _xla_attention(q_BLNH, k_BSNH, v_BSNH, is_causal)


def _flash_fits(L: int, S: int) -> bool:
    """Whether the flash kernel takes an attention of L queries over S keys: self-attention of at
    least ``FLASH_MIN_TOKENS`` tokens, in whole 128-token blocks."""
    return L == S and L >= FLASH_MIN_TOKENS and L % 128 == 0


def _flash_attention(q_BLNH: jax.Array, k_BLNH: jax.Array, v_BLNH: jax.Array, is_causal: bool) -> jax.Array:
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BLNH, k_BLNH, v_BLNH))
    return jnp.swapaxes(flash_attention_heads_major(q, k, v, is_causal), 1, 2)


def flash_attention_heads_major(q_BNLH: jax.Array, k_BNLH: jax.Array, v_BNLH: jax.Array,
                                is_causal: bool = False) -> jax.Array:
    """TPU flash attention (``flash.flash_attention``: jax's Pallas kernels) on heads-major
    (B, N, L, H) arrays, the layout the kernels read, one kernel per device: a Pallas kernel is
    not partitioned by XLA, so under a mesh it runs in ``shard_map`` over the batch's mesh axes
    (from the logical rules in context)."""
    from sdjax.models import flash

    def kernel(q, k, v):
        return flash.flash_attention(q, k, v, is_causal)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q_BNLH, k_BNLH, v_BNLH)
    spec = P(*nn.logical_to_mesh_axes(("batch", None, None, None)))
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        q_BNLH, k_BNLH, v_BNLH)


def _xla_attention(q_BLNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, is_causal: bool) -> jax.Array:
    """Heads folded into the batch (X = B*N): with one batch dimension per product XLA's CPU
    backend fuses QK^T, softmax and PV into one kernel; ``jax.nn.dot_product_attention``'s XLA
    path (batch and heads as two batch dimensions) writes out, transposes and copies the
    probabilities before PV."""
    B, L, N, H = q_BLNH.shape
    S = k_BSNH.shape[1]

    def fold(x_BTNH: jax.Array) -> jax.Array:
        return jnp.swapaxes(x_BTNH, 1, 2).reshape(B * N, x_BTNH.shape[1], H)

    logits_XLS = jnp.einsum("xlh,xsh->xls", fold(q_BLNH), fold(k_BSNH),
                            preferred_element_type=jnp.float32) * (H ** -0.5)
    if is_causal:
        logits_XLS = jnp.where(jnp.tril(jnp.ones((L, S), bool)), logits_XLS, jnp.finfo(jnp.float32).min)
    probs_XLS = jax.nn.softmax(logits_XLS, axis=-1).astype(v_BSNH.dtype)
    out_XLH = jnp.einsum("xls,xsh->xlh", probs_XLS, fold(v_BSNH))
    return jnp.swapaxes(out_XLH.reshape(B, N, L, H), 1, 2)


class Attention(nn.Module):
    """Multi-head attention named as diffusers' ``Attention`` (to_q, to_k, to_v, to_out_0).

    Self-attention when ``ctx_BSD`` is None, cross-attention otherwise.
    """
    heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str = "xla"  # see ``attention``

    @nn.compact
    def __call__(self, x_BLD: jax.Array, ctx_BSD: jax.Array | None = None) -> jax.Array:
        if ctx_BSD is None and self.implementation == "flash" and _flash_fits(x_BLD.shape[1], x_BLD.shape[1]):
            return self._flash_self_attention(x_BLD)
        ctx_BSD = x_BLD if ctx_BSD is None else ctx_BSD
        inner = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.qkv_bias)
        q = dense(inner, name="to_q", **kw)(x_BLD)
        k = dense(inner, name="to_k", **kw)(ctx_BSD)
        v = dense(inner, name="to_v", **kw)(ctx_BSD)
        B, L, S = x_BLD.shape[0], x_BLD.shape[1], ctx_BSD.shape[1]
        q_BLNH = q.reshape(B, L, self.heads, self.head_dim)
        k_BSNH = k.reshape(B, S, self.heads, self.head_dim)
        v_BSNH = v.reshape(B, S, self.heads, self.head_dim)
        out_BLNH = attention(q_BLNH, k_BSNH, v_BSNH, implementation=self.implementation)
        out_BLD = out_BLNH.reshape(B, L, inner)
        return dense(self.out_features, name="to_out_0", dtype=self.dtype, param_dtype=self.param_dtype)(out_BLD)

    def _flash_self_attention(self, x_BLD: jax.Array) -> jax.Array:
        """The TPU kernel's path: q, k, v come out of their projections heads-major (B, N, L, H),
        the layout the kernel reads, and the output projection reads the kernel's heads-major
        result, so no transpose surrounds it (at SD 1.5's 40-wide heads those transposes were a
        fifth of a 64x64 transformer's compiler-estimated cycles). Same parameters as the other
        path. (Cross-attention stays on that path: heads-major einsums there cost the TPU
        compiler's estimate more than the transposes they save; docs/benchmarks.md.)"""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (HeadsDense(self.heads * self.head_dim, heads=self.heads, use_bias=self.qkv_bias, name=name,
                              **kw)(x_BLD) for name in ("to_q", "to_k", "to_v"))
        out_BNLH = flash_attention_heads_major(q, k, v)
        return HeadsMergeDense(self.out_features, name="to_out_0", **kw)(out_BNLH)


def _dense_params(module: nn.Dense, in_features: int):
    """``module``'s kernel and bias as ``dense`` creates them (logical axes, initialisers)."""
    kernel_init = nn.with_logical_partitioning(module.kernel_init, DENSE_KERNEL_AXES)
    bias_init = nn.with_logical_partitioning(module.bias_init, ("dense_out",))
    kernel = module.param("kernel", kernel_init, (in_features, module.features), module.param_dtype)
    bias = module.param("bias", bias_init, (module.features,), module.param_dtype) if module.use_bias else None
    return kernel, bias


class HeadsDense(nn.Dense):
    """``nn.Dense`` (same parameters) whose output comes out heads-major, (B, N, L, H): the matmul
    writes the layout attention kernels read instead of a transpose after it."""
    heads: int = 1

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        kernel, bias = _dense_params(self, x_BLD.shape[-1])
        x_BLD, kernel, bias = nn.dtypes.promote_dtype(x_BLD, kernel, bias, dtype=self.dtype)
        y_BNLH = jnp.einsum("bld,dnh->bnlh", x_BLD, kernel.reshape(kernel.shape[0], self.heads, -1),
                            precision=self.precision)
        return y_BNLH if bias is None else y_BNLH + bias.reshape(self.heads, 1, -1)


def heads_to_features(x_BNLH: jax.Array) -> jax.Array:
    """(B, N, L, H) -> ``nn.Dense``'s layout (B, L, N * H)."""
    B, N, L, H = x_BNLH.shape
    return jnp.swapaxes(x_BNLH, 1, 2).reshape(B, L, N * H)


def features_to_heads(x_BLD: jax.Array, heads: int) -> jax.Array:
    """(B, L, N * H) -> heads-major (B, N, L, H)."""
    B, L, D = x_BLD.shape
    return jnp.swapaxes(x_BLD.reshape(B, L, heads, D // heads), 1, 2)


class HeadsMergeDense(nn.Dense):
    """``nn.Dense`` (same parameters) over the heads of a heads-major (B, N, L, H) input."""

    @nn.compact
    def __call__(self, x_BNLH: jax.Array) -> jax.Array:
        B, N, L, H = x_BNLH.shape
        kernel, bias = _dense_params(self, N * H)
        x_BNLH, kernel, bias = nn.dtypes.promote_dtype(x_BNLH, kernel, bias, dtype=self.dtype)
        y_BLD = jnp.einsum("bnlh,nhd->bld", x_BNLH, kernel.reshape(N, H, -1), precision=self.precision)
        return y_BLD if bias is None else y_BLD + bias


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D: GN-SiLU-conv, optional time embedding, GN-SiLU-conv, shortcut."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, temb_BD: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.groups, self.eps, name="norm1", **kw)(x_BHWC)
        h = conv(self.out_channels, 3, name="conv1", **kw)(nn.silu(h))
        if temb_BD is not None:
            t = dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb_BD))
            h = h + t[:, None, None, :]
        h = group_norm(self.groups, self.eps, name="norm2", **kw)(h)
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x_BHWC.shape[-1] != self.out_channels:
            x_BHWC = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x_BHWC)
        return constrain_image(x_BHWC + h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. ``pad_asymmetric`` pads (0, 1) on H and W first, as the
    autoencoder's encoder does (diffusers ``Downsample2D(padding=0)``)."""
    out_channels: int
    pad_asymmetric: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.pad_asymmetric else ((1, 1), (1, 1))
        return conv(self.out_channels, 3, stride=2, padding=padding, name="conv",
                    dtype=self.dtype, param_dtype=self.param_dtype)(x_BHWC)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x_BHWC)


def unbox(tree: Any) -> Any:
    """Strip logical-partitioning boxes from an initialised variable tree."""
    return nn.meta.unbox(tree)
