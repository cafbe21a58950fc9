"""One 3x3 convolution, XLA's against the im2col matmul that sdjax uses on CPU for small inputs.

    python -m benchmarks.conv_shapes [--repeats 5] [--out conv-shapes.json]

Prints a table (median of --repeats warm, synchronised calls per shape) and writes JSON; the
shapes are the SD 1.5 UNet's low levels at small resolutions plus a few where XLA's own
convolution is the faster one (see sdjax/models/layers.py: conv_general_dilated).
"""

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks import timing
from sdjax.models.layers import _im2col_conv, _use_im2col

SHAPES = (  # (batch, side, in channels, out channels)
    (2, 2, 1280, 1280), (2, 2, 2560, 1280), (2, 4, 1280, 1280), (2, 4, 2560, 1280), (16, 4, 64, 64),
    (16, 2, 64, 64), (2, 8, 1280, 1280), (16, 8, 96, 64), (2, 32, 320, 320))
DIMS = ("NHWC", "HWIO", "NHWC")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="conv-shapes.json")
    a = p.parse_args(argv)
    pad = ((1, 1), (1, 1))
    xla = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DIMS))
    im2col = jax.jit(lambda x, w: _im2col_conv(x, w, (1, 1), pad))
    rows = []
    print("| input (B, H, W, Cin) -> Cout | XLA conv | im2col | XLA / im2col | sdjax on CPU uses | max abs diff |")
    print("|---|---|---|---|---|---|")
    for b, side, cin, cout in SHAPES:
        x = jax.random.normal(jax.random.key(0), (b, side, side, cin))
        w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * cin ** -0.5
        t_xla = timing.measure(lambda: xla(x, w), jax.block_until_ready, a.repeats)["median_s"]
        t_im2col = timing.measure(lambda: im2col(x, w), jax.block_until_ready, a.repeats)["median_s"]
        diff = float(jnp.abs(xla(x, w) - im2col(x, w)).max())
        uses = "im2col" if _use_im2col(x.shape, w.shape) else "XLA conv"
        rows.append(dict(shape=[b, side, side, cin, cout], xla_s=t_xla, im2col_s=t_im2col, sdjax_uses=uses,
                         max_abs_diff=diff))
        print(f"| {b}, {side}x{side}, {cin} -> {cout} | {t_xla * 1e3:.3g} ms | {t_im2col * 1e3:.3g} ms | "
              f"{t_xla / t_im2col:.3g} | {uses} | {diff:.2g} |", flush=True)
    with open(a.out, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, repeats=a.repeats, rows=rows), f,
                  indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
