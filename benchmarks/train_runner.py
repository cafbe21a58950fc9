"""Latent-diffusion train-step benchmark (run as a subprocess): step time, images/s, model FLOPs
(XLA's cost analysis of the compiled step), MFU against a matmul peak measured in the same process,
and memory with and without rematerialisation.

    python -m benchmarks.train_runner --size tiny --batch 8 --repeats 3
"""

import argparse
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing, weights


def train_config(size: str, batch: int, image_size: int | None, remat: bool, dtype: str):
    """The tiny config, with SD 1.5 networks for ``size="sd15"`` (text encoder trained too)."""
    from sdjax import configs

    c = configs.load("tiny")
    if size == "sd15":
        nets = weights.configs("sd15")
        c.model = dict(unet=nets["unet"], vae=nets["vae"], text_encoder=nets["text_encoder"],
                       scheduler=c.model["scheduler"])
        c.data.image_size = image_size or 256
    elif image_size:
        c.data.image_size = image_size
    c.train.batch_size = batch
    c.train.remat = remat
    c.train.dtype = dtype
    c.train.scale_by_std = False
    c.train.sample_every = 0
    return c


def fake_batch(run, batch: int) -> dict[str, jax.Array]:
    s = run.config.data.image_size
    rng = np.random.default_rng(0)
    host = dict(image=rng.uniform(-1, 1, (batch, s, s, 3)).astype(np.float32),
                input_ids=rng.integers(0, len(run.tokenizer), (batch, run.seq_len), dtype=np.int32))
    return jax.device_put(host, run.program.batch_sharding)


def flops_of(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def memory_of(compiled) -> dict[str, Any]:
    """Compiled memory: arguments + outputs - donated aliases + temporaries (activations, workspace)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, k + "_in_bytes")) for k in ("argument_size", "output_size", "alias_size", "temp_size")}
    out["peak_estimate"] = out["argument_size"] + out["output_size"] - out["alias_size"] + out["temp_size"]
    return out


def matmul_peak(dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul chain, the achievable peak that MFU is measured against."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda a, b: (a @ b) @ b)
    t = timing.measure(lambda: mm(a, b), jax.block_until_ready, repeats, warmup=2)["min_s"]
    return 2 * 2 * n**3 / t


def bench_one(size: str, batch: int, image_size: int | None, remat: bool, dtype: str, repeats: int,
              run: bool) -> dict[str, Any]:
    from sdjax.training import latent

    with tempfile.TemporaryDirectory() as workdir:
        built = latent.build(train_config(size, batch, image_size, remat, dtype), workdir)
        data = fake_batch(built, batch)
        t0 = time.perf_counter()
        abstract = built.program.restore_target()
        compiled = built.program.step.lower(abstract, data, built.frozen).compile()
        out = dict(size=size, batch=batch, image_size=built.config.data.image_size, remat=remat, dtype=dtype,
                   compile_s=time.perf_counter() - t0, flops_per_step=flops_of(compiled), memory=memory_of(compiled),
                   params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params))))
        if not run:
            return out
        holder = [latent.init_state(built)]

        def step():
            holder[0], m = compiled(holder[0], data, built.frozen)
            return m["loss"]

        warm = timing.measure(step, jax.block_until_ready, repeats, warmup=2)
        out.update(step_s=warm["median_s"], times_s=warm["times_s"], images_per_s=batch / warm["median_s"],
                   loss_finite=bool(np.isfinite(float(step()))))
        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
        return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=weights.SIZES)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None, help="pixels; default: the config's (tiny 32, sd15 256)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-run", action="store_true", help="compile and analyse only (when the state does not fit)")
    a = p.parse_args(argv)
    gpu = jax.devices()[0].platform == "gpu"
    peak_dtype = jnp.bfloat16 if gpu else jnp.float32
    peak = matmul_peak(peak_dtype, 8192 if gpu else 1024)
    rows = [bench_one(a.size, a.batch, a.image_size, remat, a.dtype, a.repeats, run=not a.no_run)
            for remat in (False, True)]
    for r in rows:
        if r.get("step_s") and r.get("flops_per_step"):
            r["mfu"] = r["flops_per_step"] / r["step_s"] / peak
    timing.emit(dict(device=jax.devices()[0].device_kind, devices=jax.device_count(), matmul_peak_flops=peak,
                     matmul_peak_dtype=jnp.dtype(peak_dtype).name, rows=rows,
                     versions=timing.versions("jax", "jaxlib", "flax", "optax")))


if __name__ == "__main__":
    main()
