"""Shared layers: attention against a NumPy reference, and the shape of the products it emits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sdjax.models.layers import attention, conv


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


def _conv_reference(x, w, b, stride, pad):
    """Direct float64 convolution (NHWC x HWIO), one output position at a time."""
    x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = w.shape[0]
    ho, wo = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w.astype(np.float64))
    return out + b


@pytest.mark.parametrize("hw,channels,kernel,stride", [
    (2, 5, 3, 1), (4, 256, 3, 2), (4, 256, 3, 1), (3, 5, 3, 1),  # im2col on CPU
    (4, 5, 3, 1), (8, 256, 3, 1), (2, 5, 1, 1)])  # XLA's convolution
def test_conv_matches_float64_reference(hw, channels, kernel, stride):
    m = conv(6, kernel, name="c", dtype=jnp.float32, param_dtype=jnp.float32, stride=stride)
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, hw, hw, channels)))
    params = jax.tree.map(np.asarray, nn.unbox(m.init(jax.random.key(1), x)))["params"]
    params["bias"] = np.asarray(jax.random.normal(jax.random.key(2), (6,)))
    got = jax.jit(m.apply)({"params": params}, x)
    want = _conv_reference(x, params["kernel"], params["bias"], stride, kernel // 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x) ** 2))(params)
    want_grad = jax.grad(lambda p: jnp.sum((jax.lax.conv_general_dilated(
        x, p["kernel"], (stride, stride), [(kernel // 2, kernel // 2)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]) ** 2))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads, want_grad)


@pytest.mark.parametrize("hw,channels,matmul", [(2, 4, True), (4, 4, False), (4, 256, True), (8, 256, False)])
def test_small_convolutions_compile_to_a_matmul_on_cpu(hw, channels, matmul):
    m = conv(8, 3, name="c", dtype=jnp.float32, param_dtype=jnp.float32)
    x = jnp.ones((1, hw, hw, channels))
    hlo = jax.jit(m.apply).lower(m.init(jax.random.key(0), x), x).compile().as_text()
    assert ("convolution(" not in hlo) == matmul
