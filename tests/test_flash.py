"""TPU flash attention (sdjax.models.flash): values and gradients across several blocks in the Pallas
TPU interpreter, block choice, and the cost each kernel declares to the TPU compiler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models import flash, layers
from test_layers import reference_attention, reference_attention_grads

# Every block smaller than the sequence, so each kernel's grid has several steps on both axes.
SMALL = flash.Blocks(q=256, k_major=256, k=128, dkv_q_major=256, dkv_q=128, dkv_k_major=256, dkv_k=128,
                     dq_q=256, dq_k_major=256, dq_k=128)


def test_several_blocks_match_the_float64_reference_in_interpret_mode():
    import jax.experimental.pallas.tpu as pltpu

    rng = np.random.default_rng(0)
    q, k, v, cot = (rng.normal(size=(1, 512, 1, 40)).astype(np.float32) for _ in range(4))

    def loss(q, k, v):
        heads_major = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
        out = jnp.swapaxes(flash.flash_attention(*heads_major, False, SMALL), 1, 2)
        return jnp.sum(out * cot), out

    with pltpu.force_tpu_interpret_mode():
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float64), reference_attention(q, k, v, False), atol=1e-5, rtol=1e-5)
    for g, want in zip(grads, reference_attention_grads(q, k, v, cot)):
        np.testing.assert_allclose(np.asarray(g, np.float64), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("L", [512, 640, 1024, 4096, 9216])  # 9216: SD 2 at 768 px (96x96 latents)
def test_default_blocks_divide_the_sequence(L):
    blocks = flash.default_blocks(L, L)
    for name, block in vars(blocks).items():
        assert block >= 128 and L % block == 0, (name, block)
    assert blocks.dkv_q_major % blocks.dkv_q == 0 and blocks.dkv_k_major % blocks.dkv_k == 0
    assert blocks.k_major % blocks.k == 0 and blocks.dq_k_major % blocks.dq_k == 0


def test_kernel_costs_count_what_each_grid_moves():
    """B=2, N=3, L=S=1024, 40-wide bf16 heads (stored as 128 lanes): 1536 bytes per token of q, k,
    v, o, dO, dq, dk or dv; 3072 per token of an f32 row statistic broadcast to 128 lanes."""
    blocks = flash.Blocks(q=256, k_major=512, k=256, dkv_q_major=256, dkv_q=128, dkv_k_major=256, dkv_k=128,
                          dq_q=512, dq_k_major=256, dq_k=128)
    costs = flash.kernel_costs(2, 3, 1024, 1024, 40, 2, blocks)
    pairs = 2 * 3 * 1024 * 1024
    tok, stat = 1536, 3072
    # forward: q once, k and v once per 256-query block (4), o once, max and sum once
    assert costs["forward"].flops == 2 * 2 * pairs * 40  # QK^T and PV
    assert costs["forward"].bytes_accessed == 1024 * tok + 4 * 2 * 1024 * tok + 1024 * tok + 2 * 1024 * stat
    assert costs["forward"].transcendentals == pairs
    # dK/dV: k, v once; q, dO and three statistics once per 256-key block (4); dk, dv once
    assert costs["dkv"].flops == 4 * 2 * pairs * 40  # QK^T again, P^T dO, dO V^T, dS^T Q
    assert costs["dkv"].bytes_accessed == 2 * 1024 * tok + 4 * (2 * 1024 * tok + 3 * 1024 * stat) + 2 * 1024 * tok
    # dQ: q, dO, max, sum once, dO.O broadcast to the 256-key block once; k, v once per 512-query block (2)
    assert costs["dq"].flops == 3 * 2 * pairs * 40  # QK^T again, dO V^T again, dS K
    assert costs["dq"].bytes_accessed == (2 * 1024 * tok + 2 * 1024 * stat + 2 * 1024 * stat + 2 * 2 * 1024 * tok
                                          + 1024 * tok)
    inference = flash.kernel_costs(2, 3, 1024, 1024, 40, 2, blocks, residuals=False)["forward"]
    assert inference.bytes_accessed == costs["forward"].bytes_accessed - 2 * 1024 * stat


def _pallas_costs(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn.params["cost_estimate"])
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _pallas_costs(inner)
    return found


def test_the_training_step_declares_all_three_kernels_costs():
    """jax's kernel declares a cost for its forward only; through ``layers.attention`` the forward,
    dK/dV and dQ kernels of a gradient all carry ``kernel_costs``' estimates."""
    shape = (2, 512, 3, 64)  # (B, L, N, H)
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda q, k, v: jnp.sum(layers.attention(q, k, v, implementation="flash").astype(jnp.float32)),
        argnums=(0, 1, 2)))(x, x, x)
    want = flash.kernel_costs(2, 3, 512, 512, 64, 2, flash.default_blocks(512, 512))
    got = _pallas_costs(jaxpr.jaxpr)
    assert sorted(c.flops for c in got) == sorted(c.flops for c in want.values())
    assert sorted(c.bytes_accessed for c in got) == sorted(c.bytes_accessed for c in want.values())


def test_declaring_a_cost_changes_nothing_global_and_is_safe_under_threads():
    """Threads tracing flash attention at once, each at its own shape, each find their own kernels'
    costs in their program, and jax's flash-attention module is left as it was."""
    import threading

    from jax.experimental import pallas
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    lengths = (512, 640, 768, 1024)
    results, errors = {}, []
    start = threading.Barrier(len(lengths))

    def trace(L):
        try:
            start.wait()
            x = jax.ShapeDtypeStruct((1, 1, L, 64), jnp.bfloat16)
            jaxpr = jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(flash.flash_attention(q, k, v).astype(
                jnp.float32)), argnums=(0, 1, 2)))(x, x, x)
            results[L] = sorted(c.bytes_accessed for c in _pallas_costs(jaxpr.jaxpr))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=trace, args=(L,)) for L in lengths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for L in lengths:
        want = flash.kernel_costs(1, 1, L, L, 64, 2, flash.default_blocks(L, L))
        assert results[L] == sorted(c.bytes_accessed for c in want.values()), L
    assert fa.pl is pallas
