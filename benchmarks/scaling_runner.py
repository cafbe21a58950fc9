"""Sharded Text2Img on 1, 2, 4 and 8 fake CPU devices, same global batch: outputs must agree;
times are reported as an overhead check, not a speed claim (the fake devices share the cores).

Run as a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (run.py sets it).
"""

import argparse

import jax
import numpy as np

from benchmarks import timing
from benchmarks.sdjax_runner import PROMPT


def main(argv=None) -> None:
    from sdjax import StableDiffusion, generate, sharding

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()}: set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts.")
    sd = StableDiffusion.from_pretrained(a.folder)
    f, c = sd.downsample_factor, sd.configs.unet.in_channels
    noise = generate.starting_noise(0, a.batch, (a.height // f, a.width // f, c))
    inputs = generate.Inputs(sd.tokenize([PROMPT] * a.batch), sd.tokenize([""] * a.batch), noise)
    rows, reference = [], None
    for n in (1, 2, 4, 8):
        gen = generate.Generator(sd.generator.nets, sd.configs.scheduler, mesh=sharding.data_mesh(jax.devices()[:n]))
        call = lambda: gen(sd.params, inputs, sampler="ddim", steps=a.steps, eta=0.0, guidance_scale=7.5,  # noqa: E731
                           seed=0, scaling_factor=sd.scaling_factor)
        first = timing.first_call(call, np.asarray)
        warm = timing.measure(call, np.asarray, a.repeats, warmup=1)
        images = call()
        reference = images if reference is None else reference
        rows.append(dict(devices=n, batch_s=warm["median_s"], first_call_s=first,
                         max_abs_diff_vs_1=float(np.abs(images - reference).max())))
    timing.emit(dict(rows=rows, batch=a.batch, device=jax.devices()[0].device_kind,
                     versions=timing.versions("jax", "jaxlib", "flax")))


if __name__ == "__main__":
    main()
