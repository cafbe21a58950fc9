"""sdjax: Stable Diffusion (latent diffusion models) in JAX/Flax."""

import os

# sdjax uses transformers for its CLIP tokenizer only, so transformers' advice that PyTorch is
# missing (printed on import where torch is not installed) does not apply.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from sdjax.stable_diffusion import StableDiffusion  # noqa: E402

__all__ = ["StableDiffusion"]
__version__ = "0.1.0"
