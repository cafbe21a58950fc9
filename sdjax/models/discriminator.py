"""PatchGAN discriminator of the perceptual autoencoder, as taming-transformers' ``NLayerDiscriminator``.

conv4x4/2 + LeakyReLU(0.2), then ``n_layers - 1`` blocks of conv4x4/2 (no bias) + BatchNorm
+ LeakyReLU, one conv4x4/1 block, and a conv4x4/1 to one logit per patch. Submodules are
named after the PyTorch ``nn.Sequential`` indices (``main.3`` -> ``main_3``), so
``checkpoints.convert.torch_to_flax`` loads a taming state dict (ignoring the BatchNorm
buffers ``running_mean``, ``running_var``, ``num_batches_tracked``).

BatchNorm always normalises with the statistics of the batch it is called on, as the
original does in training mode (each call, real or fake, is normalised on its own), and keeps
no running averages: the originals only read those in eval mode, which training never uses.
Under a data-sharded mesh the statistics are those of the global batch.
"""

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from sdjax.models.layers import CONV_KERNEL_AXES, constrain_image

Dtype = Any

BN_EPS = 1e-5  # torch.nn.BatchNorm2d
LEAKY_SLOPE = 0.2


def _conv(features: int, stride: int, use_bias: bool, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
    """4x4 conv, padding 1, weights N(0, 0.02) as taming's ``weights_init``."""
    return nn.Conv(
        features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    )


def _scale_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchNorm(nn.Module):
    """BatchNorm over (B, H, W) with batch statistics only, computed in f32 (biased variance)."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        C = x_BHWC.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(_scale_init, ("norm",)), (C,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                          (C,), self.param_dtype)
        x = x_BHWC.astype(jnp.float32)
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        y = (x - mean) * jax.lax.rsqrt(var + BN_EPS) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class NLayerDiscriminator(nn.Module):
    """Image (B, H, W, 3) in [-1, 1] -> patch logits (B, H/2^n - 2, W/2^n - 2, 1) for n_layers=n."""
    ndf: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.leaky_relu(_conv(self.ndf, 2, True, "main_0", **kw)(x_BHWC.astype(self.dtype)), LEAKY_SLOPE)
        index = 2
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = _conv(self.ndf * min(2 ** n, 8), stride, False, f"main_{index}", **kw)(h)
            h = BatchNorm(name=f"main_{index + 1}", **kw)(h)
            h = constrain_image(nn.leaky_relu(h, LEAKY_SLOPE))
            index += 3
        return _conv(1, 1, True, f"main_{index}", **kw)(h).astype(jnp.float32)
