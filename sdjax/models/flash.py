"""Flash attention on TPU: jax's Pallas kernels (forward, dK/dV, dQ) with block sizes chosen for
Stable Diffusion's long self-attention, each kernel declaring its cost to the TPU compiler.

jax's ``flash_attention`` declares a cost for its forward kernel only, so a compiled training
step's figures (``cost_analysis()``, ``optimal_seconds``) would leave out the backward kernels,
and its forward estimate counts every input read once, where the kernel re-reads K and V once per
query block. Here each of the three kernels declares the FLOPs, exponentials and HBM bytes its
grid actually moves (``kernel_costs``), and larger blocks than jax's 128-token defaults cut those
re-reads. The kernels themselves are jax's, called through its module's own functions.
"""

import contextlib
import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas.ops.tpu import flash_attention as fa

LANES = 128  # TPU vector lanes: a (..., H) array's last dimension is stored padded to a multiple


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Token blocks of the three kernels. Forward: ``q`` queries per grid step against
    ``k_major`` keys, ``k`` at a time. dK/dV: ``dkv_k_major`` keys per step against ``dkv_q_major``
    queries, in ``dkv_q`` x ``dkv_k`` tiles. dQ: ``dq_q`` queries per step against ``dq_k_major``
    keys, ``dq_k`` at a time."""
    q: int
    k_major: int
    k: int
    dkv_q_major: int
    dkv_q: int
    dkv_k_major: int
    dkv_k: int
    dq_q: int
    dq_k_major: int
    dq_k: int


def _fit(block: int, n: int) -> int:
    """The largest of ``block``, ``block / 2``, ... (down to 128) that divides ``n``."""
    while block > fa.MIN_BLOCK_SIZE and n % block:
        block //= 2
    return block


def default_blocks(L: int, S: int) -> Blocks:
    """Blocks for L queries over S keys (multiples of 128). Large where a block is re-read once per
    block of the other side (the forward's and dQ's query blocks, dK/dV's key blocks); dQ's key
    block stays at 128 because its row sums are broadcast to that width in HBM."""
    q, k = _fit(1024, L), _fit(512, S)
    return Blocks(q=q, k_major=k, k=k, dkv_q_major=_fit(512, L), dkv_q=_fit(512, L), dkv_k_major=_fit(2048, S),
                  dkv_k=_fit(512, S), dq_q=q, dq_k_major=fa.MIN_BLOCK_SIZE, dq_k=fa.MIN_BLOCK_SIZE)


def kernel_costs(B: int, N: int, L: int, S: int, H: int, itemsize: int, blocks: Blocks,
                 residuals: bool = True) -> dict[str, pl.CostEstimate]:
    """What each kernel's grid computes and moves between HBM and VMEM (non-causal; a causal
    kernel skips about half the blocks, so these bound it from above); ``residuals``: the forward
    also writes the row statistics the backward kernels read.

    A block is fetched again whenever its block index changes from one grid step to the next, so
    the operand indexed by the outer sequence axis is read once and the one indexed by the inner
    axis once per outer block. Heads narrower than 128 are stored padded to 128 lanes; the f32 row
    statistics (max, sum, dO.O) are stored broadcast to 128 lanes (dQ's dO.O to its key block).
    """
    heads, stat = B * N * LANES * math.ceil(H / LANES) * itemsize, B * N * LANES * 4  # bytes per token
    pairs = B * N * L * S
    fwd = pl.CostEstimate(
        flops=4 * pairs * H, transcendentals=pairs,
        bytes_accessed=L * heads + 2 * S * heads * (L // blocks.q) + L * heads + 2 * L * stat * residuals)
    dkv = pl.CostEstimate(
        flops=8 * pairs * H, transcendentals=pairs,
        bytes_accessed=2 * S * heads + (2 * L * heads + 3 * L * stat) * (S // blocks.dkv_k_major) + 2 * S * heads)
    dq = pl.CostEstimate(
        flops=6 * pairs * H, transcendentals=pairs,
        bytes_accessed=(2 * L * heads + 2 * L * stat + L * stat * blocks.dq_k_major // LANES)
        + 2 * S * heads * (L // blocks.dq_q) + L * heads)
    return {"forward": fwd, "dkv": dkv, "dq": dq}


def with_declared_cost(fn, cost: pl.CostEstimate):
    """A copy of jax's kernel-calling function ``fn`` that gives ``cost`` to the ``pallas_call`` it
    makes (jax's backward kernels take no ``cost_estimate`` argument). The copy reads its module's
    globals from a dict of its own, where ``pl`` adds the estimate; jax's module is never changed,
    so concurrent traces (threads) each declare their own cost."""
    real = fa.pl
    pl_with_cost = types.SimpleNamespace(**{name: getattr(real, name) for name in dir(real)
                                            if not name.startswith("__")})
    pl_with_cost.pallas_call = lambda *args, **kwargs: real.pallas_call(*args, **{**kwargs, "cost_estimate": cost})
    copy = types.FunctionType(fn.__code__, {**fn.__globals__, "pl": pl_with_cost}, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _precision(dtype):
    # Mosaic rejects half-precision products at a "highest" default matmul precision (set for f32
    # parity checks); in half precision the setting has nothing to add anyway.
    half = dtype in (jnp.bfloat16, jnp.float16)
    return jax.default_matmul_precision("default") if half else contextlib.nullcontext()


def _costs(q, k, blocks, residuals=True):
    B, N, L, H = q.shape
    return kernel_costs(B, N, L, k.shape[2], H, q.dtype.itemsize, blocks, residuals)


def _forward(q, k, v, causal, blocks, save_residuals):
    impl = with_declared_cost(fa._flash_attention_impl, _costs(q, k, blocks, save_residuals)["forward"])
    with _precision(q.dtype):
        return impl(q, k, v, None, None, save_residuals, causal, q.shape[-1] ** -0.5, 1, blocks.q, blocks.k_major,
                    blocks.k, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def flash_attention(q_BNLH: jax.Array, k_BNSH: jax.Array, v_BNSH: jax.Array, causal: bool = False,
                    blocks: Blocks | None = None) -> jax.Array:
    """softmax(QK^T / sqrt(H)) V on heads-major (B, N, L, H) arrays, one device's share (run it in
    ``shard_map`` under a mesh); ``blocks`` None: ``default_blocks``."""
    blocks = blocks or default_blocks(q_BNLH.shape[2], k_BNSH.shape[2])
    return _forward(q_BNLH, k_BNSH, v_BNSH, causal, blocks, save_residuals=False)


def _flash_fwd(q, k, v, causal, blocks):
    blocks = blocks or default_blocks(q.shape[2], k.shape[2])
    o, l, m = _forward(q, k, v, causal, blocks, save_residuals=True)
    return o, (q, k, v, o, l, m)


def _flash_bwd(causal, blocks, residuals, do):
    q, k, v, o, l, m = residuals
    blocks = blocks or default_blocks(q.shape[2], k.shape[2])
    costs, scale = _costs(q, k, blocks), q.shape[-1] ** -0.5
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    with _precision(q.dtype):
        dk, dv = with_declared_cost(fa._flash_attention_bwd_dkv, costs["dkv"])(
            q, k, v, None, None, l, m, do, di, block_q_major=blocks.dkv_q_major, block_q=blocks.dkv_q,
            block_k_major=blocks.dkv_k_major, block_k=blocks.dkv_k, sm_scale=scale, causal=causal)
        dq, _ = with_declared_cost(fa._flash_attention_bwd_dq, costs["dq"])(
            q, k, v, None, None, l, m, do, di, block_q_major=blocks.dq_q, block_k_major=blocks.dq_k_major,
            block_k=blocks.dq_k, sm_scale=scale, causal=causal, mask_value=fa.DEFAULT_MASK_VALUE, debug=False)
    return dq, dk, dv


flash_attention.defvjp(_flash_fwd, _flash_bwd)
