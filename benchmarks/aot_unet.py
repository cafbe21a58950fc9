"""The SD 1.5 UNet's training forward + backward, compiled ahead of time for a TPU slice (run as a
subprocess, in sdjax's environment or the diffusers-Flax peer's, both with libtpu).

    python -m benchmarks.aot_unet --impl sdjax --topology v5:2x2x1 --chip-config megacore --bounds 2,2,1

The same step for both: bf16 compute, f32 parameters (replicated: data parallelism), a batch of
noisy latents split over the slice's devices, the loss mean((UNet(x_t, t, ctx) - noise)^2), and
its gradient (all-reduced). Prints the compiler's per-chip memory and cost as one JSON line.
Standard library + the environment's packages only for the peer: ``--impl flax`` imports no sdjax.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from benchmarks import timing, tpu_slice

# SD 1.5's UNet, as its diffusers config.json (the same dict sdjax.presets.sd15()["unet"] holds).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
    flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False)


def model(impl: str, attention: str):
    """(apply(params, x_BHWC, t_B, ctx_BLD) -> out_BHWC, abstract params) of the implementation."""
    key = jax.random.key(0)
    x = jnp.zeros((1, 64, 64, 4))
    t = jnp.zeros((1,), jnp.int32)
    ctx = jnp.zeros((1, 77, 768))
    if impl == "sdjax":
        from sdjax.models.layers import unbox
        from sdjax.models.unet import UNet, UNetConfig

        unet = UNet(UNetConfig.from_diffusers_config(SD15_UNET), dtype=jnp.bfloat16, attention=attention)
        params = unbox(jax.eval_shape(unet.init, key, x, t, ctx))["params"]
        return (lambda p, x, t, c: unet.apply({"params": p}, x, t, c)), params
    from diffusers import FlaxUNet2DConditionModel

    unet = FlaxUNet2DConditionModel.from_config(dict(SD15_UNET), dtype=jnp.bfloat16)
    nchw = lambda a: jnp.transpose(a, (0, 3, 1, 2))  # noqa: E731
    params = jax.eval_shape(unet.init, key, nchw(x), t, ctx)["params"]

    def apply(p, x, t, c):
        out = unet.apply({"params": p}, nchw(x), t, c).sample
        return jnp.transpose(out, (0, 2, 3, 1))

    return apply, params


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("sdjax", "flax"), required=True)
    p.add_argument("--attention", default="auto", help="sdjax only: auto, xla or flash")
    tpu_slice.add_args(p, "v5:2x2x1")
    p.add_argument("--hlo", help="also write the compiled program's HLO text here (for benchmarks.hlo_ops)")
    a = p.parse_args(argv)
    devices = tpu_slice.devices(a)
    mesh = Mesh(np.asarray(devices), ("data",))
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    attention = "flash" if a.attention == "auto" else a.attention
    apply, params = model(a.impl, attention)
    B = a.per_chip_batch * len(devices)

    def loss(params, x, t, ctx, noise):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            if a.impl == "sdjax":
                import flax.linen as nn

                with nn.logical_axis_rules((("batch", "data"),)):
                    out = apply(params, x, t, ctx)
            else:
                out = apply(params, x, t, ctx)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - noise))

    sds = lambda shape, dt, s: jax.ShapeDtypeStruct(shape, dt, sharding=s)  # noqa: E731
    args = (jax.tree.map(lambda x: sds(x.shape, x.dtype, rep), params), sds((B, 64, 64, 4), jnp.bfloat16, batch),
            sds((B,), jnp.int32, batch), sds((B, 77, 768), jnp.bfloat16, batch),
            sds((B, 64, 64, 4), jnp.float32, batch))
    step = jax.jit(jax.value_and_grad(loss), out_shardings=(rep, rep))
    figures, hlo = tpu_slice.compile_figures(step.lower(*args))
    if a.hlo:
        with open(a.hlo, "w") as f:
            f.write(hlo)
    timing.emit(dict(
        impl=a.impl, attention=attention if a.impl == "sdjax" else "diffusers default", devices=len(devices),
        device_kind=devices[0].device_kind, per_chip_batch=a.per_chip_batch, **figures,
        versions=timing.versions("jax", "jaxlib", "flax", "libtpu", "diffusers")))

if __name__ == "__main__":
    main()
