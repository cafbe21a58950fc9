"""Shared layers: attention against a NumPy reference, and the shape of the products it emits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models.layers import attention


def reference_attention(q_BLNH: np.ndarray, k_BSNH: np.ndarray, v_BSNH: np.ndarray, is_causal: bool) -> np.ndarray:
    q, k, v = (x.astype(np.float64) for x in (q_BLNH, k_BSNH, v_BSNH))
    logits_BNLS = np.einsum("blnh,bsnh->bnls", q, k) / np.sqrt(q.shape[-1])
    if is_causal:
        L, S = logits_BNLS.shape[-2:]
        logits_BNLS = np.where(np.tril(np.ones((L, S), bool)), logits_BNLS, -np.inf)
    probs = np.exp(logits_BNLS - logits_BNLS.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnls,bsnh->blnh", probs, v)


@pytest.mark.parametrize("L,S,is_causal", [(12, 12, False), (12, 5, False), (9, 9, True)])
def test_attention_matches_reference(L, S, is_causal):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, L, 3, 4), dtype=np.float32)
    k, v = (rng.standard_normal((2, S, 3, 4), dtype=np.float32) for _ in range(2))
    out = jax.jit(attention, static_argnames="is_causal")(q, k, v, is_causal=is_causal)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference_attention(q, k, v, is_causal), rtol=1e-5, atol=1e-6)

    out_bf16 = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), is_causal=is_causal)
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_bf16, np.float32), reference_attention(q, k, v, is_causal), atol=0.05)


def test_attention_products_have_one_batch_dimension():
    # With two batch dimensions XLA's CPU backend writes out, transposes and copies the
    # probabilities before PV (the tiny UNet ran 2.7x slower); heads fold into the batch instead.
    q = jnp.zeros((2, 16, 8, 4))
    eqns = jax.make_jaxpr(attention)(q, q, q).eqns
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    for e in dots:
        (_, _), (lhs_batch, rhs_batch) = e.params["dimension_numbers"]
        assert len(lhs_batch) == len(rhs_batch) == 1
