"""LPIPS perceptual distance with VGG16 features (Zhang et al. 2018), as taming's ``LPIPS``.

Both images (NHWC, [-1, 1]) are shifted and scaled to VGG's input statistics, run through
the five VGG16 feature stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), unit-normalised
along channels; the squared differences go through learned 1x1 heads ``lin0..lin4``
(no bias), are averaged over space and summed over stages.

Weights file (``LPIPS_KEYS``): one safetensors file in PyTorch layout,
``features.{i}.weight`` (O, I, 3, 3) / ``features.{i}.bias`` for the 13 convs at
torchvision's ``vgg16().features`` indices, and ``lin{k}.weight`` (1, C_k, 1, 1) from the
LPIPS ``vgg.pth``; ``sdjax/tools/convert_lpips.py`` writes it from those two files;
``sdjax.checkpoints.load.load_lpips`` reads it.
"""

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from sdjax.models.layers import CONV_KERNEL_AXES

Dtype = Any

# ScalingLayer of the original: (x - shift) / scale maps [-1, 1] images to VGG's input statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
# (torchvision feature index, output channels) of each conv, grouped by stage; a 2x2 max-pool
# precedes every stage but the first.
VGG16_STAGES = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
LPIPS_KEYS = tuple(
    [f"features.{i}.{p}" for stage in VGG16_STAGES for i, _ in stage for p in ("weight", "bias")]
    + [f"lin{k}.weight" for k in range(len(VGG16_STAGES))]
)


def normalize_features(f_BHWC: jax.Array) -> jax.Array:
    """f / (||f||_channels + 1e-10), with a finite gradient where the features are all zero."""
    sq = jnp.sum(jnp.square(f_BHWC), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f_BHWC / (norm + NORM_EPS)


class LPIPS(nn.Module):
    """(x0, x1) NHWC in [-1, 1] -> per-example distance (B,), computed in f32 by default."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _features(self, x_BHWC: jax.Array) -> list[jax.Array]:
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        h = ((x_BHWC.astype(jnp.float32) - shift) / scale).astype(self.dtype)
        feats = []
        for s, stage in enumerate(VGG16_STAGES):
            if s:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for index, channels in stage:
                h = nn.relu(self.convs[index](h))
            feats.append(h)
        return feats

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.convs = {
            index: nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), name=f"features_{index}",
                           kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                    CONV_KERNEL_AXES),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                           **kw)
            for stage in VGG16_STAGES for index, channels in stage
        }
        self.lins = [
            nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}", dtype=jnp.float32, param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_KERNEL_AXES))
            for k in range(len(VGG16_STAGES))
        ]

    def __call__(self, x0_BHWC: jax.Array, x1_BHWC: jax.Array) -> jax.Array:
        total = 0.0
        for lin, f0, f1 in zip(self.lins, self._features(x0_BHWC), self._features(x1_BHWC)):
            d = jnp.square(normalize_features(f0.astype(jnp.float32)) - normalize_features(f1.astype(jnp.float32)))
            total = total + jnp.mean(lin(d), axis=(1, 2, 3))
        return total
