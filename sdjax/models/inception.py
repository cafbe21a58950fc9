"""FID's Inception V3: pytorch-fid's ``InceptionV3([3])`` over its ``fid_inception_v3``.

The network TensorFlow's original FID used (inception-2015-12-05), as pytorch-fid ports it onto
torchvision's ``Inception3``: average pools that do not count padding, a max pool in the last
block's pool branch, BatchNorm with eps 1e-3. Input: images in [0, 1], resized to 299x299
bilinearly (half-pixel centres, no antialiasing: ``F.interpolate(align_corners=False)``), scaled
to [-1, 1]; output: the 2048 channels of the final average pool.

Parameter names follow torchvision's state dict (``Mixed_5b/branch1x1/conv/kernel``,
``.../bn/running_mean``), so ``sdjax.checkpoints.convert.torch_to_flax`` reads pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (``sdjax.checkpoints.load.load_inception``).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any
SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3


class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm with PyTorch's four tensors: (x - mean) / sqrt(var + eps) * scale + bias, in f32."""
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x.astype(jnp.float32) - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv2d(nn.Module):
    """torchvision's ``BasicConv2d``: conv (no bias), BatchNorm, ReLU."""
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)), use_bias=False,
                    dtype=self.dtype, name="conv")(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x)).astype(self.dtype)


def _conv(dtype: Dtype, name: str, features: int, kernel: tuple[int, int], **kw: Any) -> BasicConv2d:
    return BasicConv2d(features, kernel, dtype=dtype, name=name, **kw)


def _avg_pool(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1, the padding not counted (TensorFlow's average pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_conv, self.dtype)
        b1 = conv("branch1x1", 64, (1, 1))(x)
        b5 = conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(conv("branch5x5_1", 48, (1, 1))(x))
        b3 = conv("branch3x3dbl_1", 64, (1, 1))(x)
        b3 = conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3))
        bp = conv("branch_pool", self.pool_features, (1, 1))(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_conv, self.dtype)
        b3 = conv("branch3x3", 384, (3, 3), stride=2)(x)
        bd = conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(conv("branch3x3dbl_1", 64, (1, 1))(x))
        bd = conv("branch3x3dbl_3", 96, (3, 3), stride=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_conv, self.dtype)
        c7, row, col = self.channels_7x7, dict(padding=(0, 3)), dict(padding=(3, 0))
        b1 = conv("branch1x1", 192, (1, 1))(x)
        b7 = conv("branch7x7_1", c7, (1, 1))(x)
        b7 = conv("branch7x7_3", 192, (7, 1), **col)(conv("branch7x7_2", c7, (1, 7), **row)(b7))
        bd = conv("branch7x7dbl_1", c7, (1, 1))(x)
        bd = conv("branch7x7dbl_3", c7, (1, 7), **row)(conv("branch7x7dbl_2", c7, (7, 1), **col)(bd))
        bd = conv("branch7x7dbl_5", 192, (1, 7), **row)(conv("branch7x7dbl_4", c7, (7, 1), **col)(bd))
        bp = conv("branch_pool", 192, (1, 1))(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_conv, self.dtype)
        b3 = conv("branch3x3_2", 320, (3, 3), stride=2)(conv("branch3x3_1", 192, (1, 1))(x))
        b7 = conv("branch7x7x3_1", 192, (1, 1))(x)
        b7 = conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7))
        b7 = conv("branch7x7x3_4", 192, (3, 3), stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    """The last two blocks; pytorch-fid's ``FIDInceptionE_2`` max-pools its pool branch (``pool="max"``)."""
    pool: str = "avg"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_conv, self.dtype)
        row, col = dict(padding=(0, 1)), dict(padding=(1, 0))
        b1 = conv("branch1x1", 320, (1, 1))(x)
        b3 = conv("branch3x3_1", 384, (1, 1))(x)
        b3 = jnp.concatenate([conv("branch3x3_2a", 384, (1, 3), **row)(b3),
                              conv("branch3x3_2b", 384, (3, 1), **col)(b3)], axis=-1)
        bd = conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(conv("branch3x3dbl_1", 448, (1, 1))(x))
        bd = jnp.concatenate([conv("branch3x3dbl_3a", 384, (1, 3), **row)(bd),
                              conv("branch3x3dbl_3b", 384, (3, 1), **col)(bd)], axis=-1)
        pooled = _max_pool(x, stride=1, pad=1) if self.pool == "max" else _avg_pool(x)
        bp = conv("branch_pool", 192, (1, 1))(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images_BHWC: jax.Array, size: int = SIZE) -> jax.Array:
    """PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``: half-pixel centres, edge
    samples clamped, no antialiasing when shrinking."""
    B, _, _, C = images_BHWC.shape
    return jax.image.resize(images_BHWC.astype(jnp.float32), (B, size, size, C), "linear", antialias=False)


class FIDInceptionV3(nn.Module):
    """Images (B, H, W, 3) in [0, 1] -> pool features (B, 2048) in f32."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images_BHWC: jax.Array) -> jax.Array:
        if images_BHWC.ndim != 4 or images_BHWC.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 takes RGB images (batch, height, width, 3), got {images_BHWC.shape}.")
        x = (2 * resize_bilinear(images_BHWC) - 1).astype(self.dtype)
        conv = functools.partial(_conv, self.dtype)
        x = conv("Conv2d_1a_3x3", 32, (3, 3), stride=2)(x)
        x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)
        x = _max_pool(conv("Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x))
        x = conv("Conv2d_3b_1x1", 80, (1, 1))(x)
        x = _max_pool(conv("Conv2d_4a_3x3", 192, (3, 3))(x))
        kw = dict(dtype=self.dtype)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, name=name, **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name, **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE("avg", name="Mixed_7b", **kw)(x)
        x = InceptionE("max", name="Mixed_7c", **kw)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
