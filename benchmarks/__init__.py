"""Benchmarks of sdjax against its peers (diffusers Flax and PyTorch): ``python -m benchmarks.run``."""
