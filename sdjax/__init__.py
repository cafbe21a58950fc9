"""sdjax: Stable Diffusion (latent diffusion models) in JAX/Flax."""

from sdjax.stable_diffusion import StableDiffusion

__all__ = ["StableDiffusion"]
__version__ = "0.1.0"
