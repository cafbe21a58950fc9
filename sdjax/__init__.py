"""Stable Diffusion in JAX/Flax."""
