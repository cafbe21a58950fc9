"""Stable Diffusion 1.x (1.4 / 1.5) architecture: CLIP ViT-L/14, kl-f8, epsilon prediction.

Parameter counts (no memory used):
    python -m sdjax.params --config configs/sd15.py
"""

import ml_collections

from sdjax import presets


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = presets.sd15()
    return config
