"""Shared layers: attention against a NumPy reference, and the shape of the products it emits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sdjax.models import layers
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


def test_group_norm_of_a_nearly_flat_input_matches_float64():
    """Each group a plain colour (mean 1-2) with a texture of 3e-4: normalised, the texture is the
    whole output, so the statistics must not lose it to cancellation (float32 E[x^2] - E[x]^2 misses
    float64 by ~1e-4 here; the mean of squared deviations by ~5e-6)."""
    rng = np.random.default_rng(0)
    x = (2.0 * rng.uniform(0.5, 1.0, (2, 1, 1, 16)) + 3e-4 * rng.standard_normal((2, 16, 16, 16))).astype(np.float32)
    g = x.astype(np.float64).reshape(2, 256, 4, 4)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    want = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
    m = layers.group_norm(4, 1e-6, name="norm", dtype=jnp.float32, param_dtype=jnp.float32)
    got = jax.jit(m.apply)(nn.unbox(m.init(jax.random.key(0), x)), x)
    assert np.abs(want).max() > 1.0  # the texture, normalised, is what the comparison sees
    np.testing.assert_allclose(got, want, rtol=0, atol=2.5e-5)


@pytest.mark.parametrize("hw,channels,matmul", [(2, 4, True), (4, 4, False), (4, 256, True), (8, 256, False)])
def test_small_convolutions_compile_to_a_matmul_on_cpu(hw, channels, matmul):
    m = conv(8, 3, name="c", dtype=jnp.float32, param_dtype=jnp.float32)
    x = jnp.ones((1, hw, hw, channels))
    hlo = jax.jit(m.apply).lower(m.init(jax.random.key(0), x), x).compile().as_text()
    assert ("convolution(" not in hlo) == matmul


def test_attention_resolves_per_platform():
    assert layers.resolve_attention("auto", "tpu", jnp.float32) == "flash"
    assert layers.resolve_attention("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert layers.resolve_attention("auto", "gpu", jnp.float32) == "xla"  # cuDNN takes half precision only
    assert layers.resolve_attention("auto", "cpu", jnp.bfloat16) == "xla"
    assert layers.resolve_attention("xla", "tpu", jnp.bfloat16) == "xla"  # forced
    with pytest.raises(ValueError, match="attention='fast'"):
        layers.resolve_attention("fast", "tpu", jnp.float32)


@pytest.mark.parametrize("head_dim,dtype,tol", [(40, jnp.float32, 1e-5), (64, jnp.float32, 1e-5),
                                                (64, jnp.bfloat16, 1e-2)])
def test_tpu_flash_attention_matches_reference_in_interpret_mode(head_dim, dtype, tol):
    """jax's Pallas TPU flash-attention kernel, run by Pallas' TPU interpreter on the CPU, against
    the float64 reference: values and gradients (SD 1.5's 40-wide and SD 2's 64-wide heads)."""
    import jax.experimental.pallas.tpu as pltpu

    L = layers.FLASH_MIN_TOKENS
    rng = np.random.default_rng(head_dim)
    q, k, v = (rng.normal(size=(1, L, 2, head_dim)).astype(np.float32) for _ in range(3))
    cot = rng.normal(size=(1, L, 2, head_dim)).astype(np.float32)

    def loss(q, k, v, implementation):
        out = layers.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    with pltpu.force_tpu_interpret_mode():
        (_, flash), grads = jax.jit(jax.value_and_grad(functools.partial(loss, implementation="flash"),
                                                       argnums=(0, 1, 2), has_aux=True))(q, k, v)
    jaxpr = jax.make_jaxpr(functools.partial(loss, implementation="flash"))(q, k, v)
    assert "pallas_call" in str(jaxpr)  # the kernel, not the einsum path
    want = reference_attention(q, k, v, is_causal=False)
    np.testing.assert_allclose(np.asarray(flash, np.float64), want, atol=tol, rtol=tol)
    for g, w in zip(grads, reference_attention_grads(q, k, v, cot)):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, atol=10 * tol, rtol=10 * tol)


def reference_attention_grads(q_BLNH, k_BSNH, v_BSNH, cot_BLNH):
    """Gradients of sum(attention(q, k, v) * cot) with respect to q, k, v, in float64, written out:
    dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP P)), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d)."""
    q, k, v, do = (np.swapaxes(x.astype(np.float64), 1, 2) for x in (q_BLNH, k_BSNH, v_BSNH, cot_BLNH))
    scale = q.shape[-1] ** -0.5
    s = q @ np.swapaxes(k, -1, -2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dv = np.swapaxes(p, -1, -2) @ do
    dp = do @ np.swapaxes(v, -1, -2)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
    dq, dk = ds @ k * scale, np.swapaxes(ds, -1, -2) @ q * scale
    return [np.swapaxes(x, 1, 2) for x in (dq, dk, dv)]


def test_flash_attention_module_projects_heads_major_with_the_same_parameters():
    """``Attention`` with the flash kernel projects q/k/v straight to (B, N, L, H) and its output
    projection reads (B, N, L, H) (no transposes around the kernel): the same parameter tree as
    the XLA path, and the same outputs and parameter gradients (TPU interpreter); cross-attention
    takes the XLA path."""
    import jax.experimental.pallas.tpu as pltpu

    rng = np.random.default_rng(5)
    L, D = layers.FLASH_MIN_TOKENS, 80
    x = rng.normal(size=(1, L, D)).astype(np.float32)
    ctx = rng.normal(size=(1, 7, 24)).astype(np.float32)
    for context in (None, ctx):
        flash = layers.Attention(2, 40, D, implementation="flash")
        xla = flash.clone(implementation="xla")
        params = layers.unbox(xla.init(jax.random.key(0), x, context))["params"]
        params = jax.tree.map(lambda p: p + 0.01 * np.arange(p.size, dtype=np.float32).reshape(p.shape) / p.size,
                              params)
        flash_shapes = layers.unbox(jax.eval_shape(flash.init, jax.random.key(0), x, context))["params"]
        assert jax.tree.map(lambda p: p.shape, flash_shapes) == jax.tree.map(lambda p: p.shape, params)

        def loss(p, module):
            out = module.apply({"params": p}, x, context)
            return jnp.sum(out * jnp.cos(out)), out

        with pltpu.force_tpu_interpret_mode():
            (_, got), g_got = jax.jit(jax.value_and_grad(functools.partial(loss, module=flash), has_aux=True))(params)
        jaxpr = str(jax.make_jaxpr(functools.partial(loss, module=flash))(params))
        assert ("pallas_call" in jaxpr) == (context is None)  # the kernel for self-attention only
        (_, want), g_want = jax.value_and_grad(functools.partial(loss, module=xla), has_aux=True)(params)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_flash_attention_runs_per_device_under_a_mesh():
    """Under a mesh the kernel runs in shard_map over the batch's mesh axes (a Pallas kernel is not
    partitioned by XLA): two CPU devices, each its half of the batch, in the TPU interpreter."""
    import jax.experimental.pallas.tpu as pltpu
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(2, layers.FLASH_MIN_TOKENS, 2, 64)).astype(np.float32) for _ in range(3))

    def f(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules((("batch", "data"),)):
            return attention(q, k, v, implementation="flash")

    batch = NamedSharding(mesh, P("data"))
    fn = jax.jit(f, in_shardings=(batch,) * 3, out_shardings=batch)
    assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
    with pltpu.force_tpu_interpret_mode():
        out = fn(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float64), reference_attention(q, k, v, False), atol=1e-5, rtol=1e-5)
