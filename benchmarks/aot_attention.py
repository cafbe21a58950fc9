"""How the TPU compiler costs one attention layer's kernel: jax's splash kernel as MaxDiffusion calls
it (its ``flash`` attention; the kernel declares no cost), jax's flash kernel with the cost it
declares (what sdjax's kernels build on), XLA's einsums, and diffusers-Flax's attention (einsums
with the heads folded into the batch); forward only, bf16, compiled for a TPU slice on this host
(libtpu, no TPU).

    python -m benchmarks.aot_attention --impl splash --topology v5:2x2x1 --chip-config megacore --bounds 2,2,1 \\
        --per-chip-batch 16 --heads 5 --tokens 4096 --head-dim 64

Prints the compiler's FLOPs, bytes and roofline time, and the layer's model FLOPs (4 B N L^2 H per
chip), as one JSON line: a kernel without a declared cost is counted as no FLOPs and no time
beyond its operands' bytes, which is how MaxDiffusion's splash layers enter its programs' figures.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from benchmarks import timing, tpu_slice


def splash(q, k, v, block: int):
    """jax's splash kernel as MaxDiffusion's ``_tpu_flash_attention`` makes it (full mask, vmapped over the batch)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    N, L, S, H = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    mask = masks.MultiHeadMask([masks.FullMask((L, S)) for _ in range(N)])
    blocks = kernel.BlockSizes(block_q=block, block_kv_compute=block, block_kv=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mha = kernel.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks)
    return jax.vmap(mha)(q * H**-0.5, k, v)


def flash(q, k, v, block: int):
    """jax's flash kernel, whose forward declares its cost to the compiler."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    return fa.flash_attention(q, k, v, sm_scale=q.shape[3] ** -0.5,
                              block_sizes=fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1))


def xla(q, k, v, block: int):
    """XLA's einsums, the f32 logits in HBM."""
    s = jnp.einsum("bnlh,bnsh->bnls", q, k, preferred_element_type=jnp.float32) * q.shape[3] ** -0.5
    return jnp.einsum("bnls,bnsh->bnlh", jax.nn.softmax(s, axis=-1).astype(q.dtype), v)


def diffusers(q, k, v, block: int):
    """diffusers-Flax 0.39's ``FlaxAttention`` (its default: heads folded into the batch, bf16 logits
    and softmax, no fused kernel)."""
    B, N, L, H = q.shape
    fold = lambda x: x.reshape(B * N, x.shape[2], H)  # noqa: E731
    scores = jnp.einsum("b i d, b j d->b i j", fold(q), fold(k)) * H**-0.5
    out = jnp.einsum("b i j, b j d -> b i d", jax.nn.softmax(scores, axis=2), fold(v))
    return out.reshape(B, N, L, H)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tpu_slice.add_args(p, "v5:2x2x1")
    p.add_argument("--impl", required=True, choices=("splash", "flash", "xla", "diffusers"))
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=1024, help="the kernels' query and key block (tokens)")
    a = p.parse_args(argv)
    devices = tpu_slice.devices(a)
    mesh = Mesh(np.asarray(devices), ("data",))
    impl = {"splash": splash, "flash": flash, "xla": xla, "diffusers": diffusers}[a.impl]
    fn = jax.jit(jax.shard_map(lambda q, k, v: impl(q, k, v, min(a.block, a.tokens)), mesh=mesh,
                               in_specs=(P("data"),) * 3, out_specs=P("data"), check_vma=False))
    x = jax.ShapeDtypeStruct((a.per_chip_batch * len(devices), a.heads, a.tokens, a.head_dim), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P("data")))
    figures, _ = tpu_slice.compile_figures(fn.lower(x, x, x))
    timing.emit(dict(impl=a.impl, per_chip_batch=a.per_chip_batch, heads=a.heads, tokens=a.tokens, head_dim=a.head_dim,
                     model_flops=4 * a.per_chip_batch * a.heads * a.tokens**2 * a.head_dim, **figures,
                     versions=timing.versions("jax", "jaxlib", "libtpu")))


if __name__ == "__main__":
    main()
