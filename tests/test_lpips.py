"""LPIPS against a PyTorch LPIPS written as the original (taming / lpips v0.1), random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from sdjax.checkpoints.convert import CheckpointError
from sdjax.models.lpips import LPIPS, normalize_features, load_lpips_params
from sdjax.tools import convert_lpips


def torchvision_vgg16_features() -> tnn.Sequential:
    """torchvision's ``vgg16().features`` (config "D"), same indices."""
    layers, c_in = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(tnn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [tnn.Conv2d(c_in, v, kernel_size=3, padding=1), tnn.ReLU(inplace=True)]
            c_in = v
    return tnn.Sequential(*layers)


class NetLinLayer(tnn.Module):
    def __init__(self, chn_in):
        super().__init__()
        self.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(chn_in, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x):
        return self.model(x)


class TorchLPIPS(tnn.Module):
    """taming.modules.losses.lpips.LPIPS: ScalingLayer, vgg16 slices, normalize_tensor, lins."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])
        self.features = torchvision_vgg16_features()
        self.slices = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
        self.lins = tnn.ModuleList([NetLinLayer(c) for c in (64, 128, 256, 512, 512)])

    def stages(self, x):
        outs = []
        for a, b in self.slices:
            for i in range(a, b):
                x = self.features[i](x)
            outs.append(x)
        return outs

    def forward(self, x0, x1):
        norm = lambda f: f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)
        f0s = self.stages((x0 - self.shift) / self.scale)
        f1s = self.stages((x1 - self.shift) / self.scale)
        val = 0
        for lin, f0, f1 in zip(self.lins, f0s, f1s):
            val = val + lin((norm(f0) - norm(f1)) ** 2).mean([2, 3], keepdim=True)
        return val


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    model = TorchLPIPS().eval()
    with torch.no_grad():
        for lin in model.lins:  # the learned heads are non-negative
            lin.model[1].weight.uniform_(0.0, 1.0)
    d = tmp_path_factory.mktemp("lpips")
    vgg = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # a torchvision checkpoint carries the classifier too
    torch.save(vgg, d / "vgg16.pth")
    torch.save({f"lin{k}.model.1.weight": lin.model[1].weight for k, lin in enumerate(model.lins)}, d / "vgg.pth")
    out = d / "lpips_vgg.safetensors"
    convert_lpips.main(["--vgg", str(d / "vgg16.pth"), "--lin", str(d / "vgg.pth"), "--out", str(out)])
    return model, str(out)


def test_matches_original(reference):
    model, path = reference
    params = load_lpips_params(path)
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
        load_lpips_params(str(bad))
