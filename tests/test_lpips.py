"""LPIPS against a PyTorch LPIPS written as the original (taming / lpips v0.1), random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.checkpoints.errors import CheckpointError
from sdjax.checkpoints.load import load_lpips
from sdjax.models.lpips import LPIPS, normalize_features
from tests.lpips_reference import write_reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_reference(tmp_path_factory.mktemp("lpips"))


def test_distances_match_the_original_torch_lpips(reference):
    model, path = reference
    params = load_lpips(path)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    x1 = np.clip(x0 + 0.3 * rng.standard_normal(x0.shape), -1, 1).astype(np.float32)
    x1[2] = x0[2]  # identical pair: distance 0
    got = jax.jit(LPIPS().apply)({"params": params}, x0, x1)
    with torch.no_grad():
        to = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
        want = model(to(x0), to(x1)).reshape(-1).numpy()
    assert got.shape == (3,)
    assert want[0] > 1e-2 and want[2] == 0.0
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_normalize_features_has_finite_gradient_on_dead_features():
    """Pixels whose ReLU features are all zero (common on flat images) must not give NaN gradients."""
    f = np.zeros((1, 2, 2, 8), np.float32)
    f[0, 0, 0] = np.arange(8)
    got = normalize_features(f)
    np.testing.assert_allclose(got[0, 0, 0], np.arange(8) / (np.sqrt(140.0) + 1e-10), rtol=1e-6)
    np.testing.assert_array_equal(got[0, 1], 0.0)
    grad = jax.grad(lambda x: jnp.sum(normalize_features(x) * jnp.arange(8.0)))(f)
    assert np.isfinite(np.asarray(grad)).all()


def test_bad_file_is_reported(tmp_path):
    from safetensors.numpy import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)}, str(bad))
    with pytest.raises(CheckpointError, match="missing from checkpoint"):
        load_lpips(str(bad))
