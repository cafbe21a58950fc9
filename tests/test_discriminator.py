"""PatchGAN discriminator against taming-transformers' NLayerDiscriminator in training mode."""

import jax
import numpy as np
import torch
from torch import nn as tnn

from sdjax.checkpoints.convert import torch_to_flax
from sdjax.models.discriminator import NLayerDiscriminator
from sdjax.models.layers import unbox


def torch_nlayer_discriminator(input_nc=3, ndf=64, n_layers=3) -> tnn.Module:
    """taming.modules.discriminator.model.NLayerDiscriminator with BatchNorm, and its weights_init."""
    kw, padw = 4, 1
    sequence = [tnn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), tnn.LeakyReLU(0.2, True)]
    nf_mult = 1
    for n in range(1, n_layers):
        nf_mult_prev, nf_mult = nf_mult, min(2 ** n, 8)
        sequence += [tnn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=False),
                     tnn.BatchNorm2d(ndf * nf_mult), tnn.LeakyReLU(0.2, True)]
    nf_mult_prev, nf_mult = nf_mult, min(2 ** n_layers, 8)
    sequence += [tnn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=False),
                 tnn.BatchNorm2d(ndf * nf_mult), tnn.LeakyReLU(0.2, True)]
    sequence += [tnn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
    model = tnn.Module()
    model.main = tnn.Sequential(*sequence)
    for m in model.modules():
        if isinstance(m, tnn.Conv2d):
            tnn.init.normal_(m.weight.data, 0.0, 0.02)
        elif isinstance(m, tnn.BatchNorm2d):
            tnn.init.normal_(m.weight.data, 1.0, 0.02)
            tnn.init.normal_(m.bias.data, 0.0, 0.2)  # non-zero, so the bias mapping is tested
    return model


def test_matches_taming_in_training_mode():
    torch.manual_seed(0)
    model = torch_nlayer_discriminator(ndf=8, n_layers=3).train()
    rng = np.random.default_rng(0)
    x_BHWC = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    disc = NLayerDiscriminator(ndf=8, n_layers=3)
    target = unbox(jax.eval_shape(disc.init, jax.random.key(0), x_BHWC))["params"]
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = torch_to_flax(state, target, what="discriminator",
                           ignore=("running_mean", "running_var", "num_batches_tracked"))
    got = jax.jit(disc.apply)({"params": params}, x_BHWC)
    with torch.no_grad():
        want = model.main(torch.from_numpy(x_BHWC).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape == (4, 2, 2, 1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want).std() > 0.1


def test_init_matches_taming_statistics():
    disc = NLayerDiscriminator(ndf=16, n_layers=2)
    params = unbox(jax.jit(disc.init)(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32)))["params"]
    assert sorted(params) == ["main_0", "main_2", "main_3", "main_5", "main_6", "main_8"]
    assert "bias" not in params["main_2"] and "bias" in params["main_8"]
    np.testing.assert_allclose(np.std(params["main_5"]["kernel"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.mean(params["main_3"]["scale"]), 1.0, atol=0.01)
