"""Stable Diffusion 2.x (2.0-v / 2.1) architecture: OpenCLIP ViT-H (23 layers), kl-f8, v-prediction.

Parameter counts (no memory used):
    python -m sdjax.params --config configs/sd21.py
"""

import ml_collections

from sdjax import presets


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = presets.sd21()
    return config
