"""The KL autoencoder against diffusers' AutoencoderKL (tiny, random) and closed-form math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.checkpoints.convert import torch_to_flax
from sdjax.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from sdjax.models.layers import unbox

TINY = AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
TINY_3_LEVELS = AutoencoderConfig(in_channels=3, out_channels=2, block_out_channels=(16, 32, 32), layers_per_block=2,
                                  norm_num_groups=4, latent_channels=3)


def random_torch_vae(cfg: AutoencoderConfig, seed: int):
    """diffusers AutoencoderKL in eval/f32 with every parameter random, norms included."""
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    torch.manual_seed(seed)
    d = cfg.to_diffusers_config()
    d.pop("_class_name")
    model = TorchAutoencoderKL(**d).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


def flax_params_from_torch(model, cfg: AutoencoderConfig, x_BHWC):
    target = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.key(0), x_BHWC)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return {"params": torch_to_flax(state, unbox(target)["params"], what="vae")}


@pytest.mark.parametrize("cfg,seed", [(TINY, 0), (TINY_3_LEVELS, 1)])
def test_encode_and_decode_match_diffusers_autoencoderkl(cfg, seed):
    model = random_torch_vae(cfg, seed)
    rng = np.random.default_rng(seed)
    f = cfg.downsample_factor
    x_BHWC = rng.uniform(-1, 1, (2, 4 * f, 6 * f, cfg.in_channels)).astype(np.float32)  # non-square: H vs W
    z_BhwC = rng.standard_normal((2, 4, 6, cfg.latent_channels)).astype(np.float32)
    params = flax_params_from_torch(model, cfg, x_BHWC)

    def enc_dec(m, x, z):
        post = m.encode(x)
        return post.mean, post.logvar, m.decode(z)

    mean, logvar, out = jax.jit(lambda p, x, z: AutoencoderKL(cfg).apply(p, x, z, method=enc_dec))(
        params, x_BHWC, z_BhwC)

    with torch.no_grad():
        post = model.encode(torch.from_numpy(x_BHWC).permute(0, 3, 1, 2)).latent_dist
        ref_out = model.decode(torch.from_numpy(z_BhwC).permute(0, 3, 1, 2)).sample
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    assert mean.shape == (2, 4, 6, cfg.latent_channels)
    assert out.shape == x_BHWC.shape[:3] + (cfg.out_channels,)
    np.testing.assert_allclose(mean, nhwc(post.mean), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, nhwc(post.logvar), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out, nhwc(ref_out), atol=1e-4, rtol=0)
    assert np.abs(nhwc(ref_out)).max() > 0.1  # the comparison is not between two near-zero tensors


def test_diagonal_gaussian_against_float64():
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((3, 2, 5, 8)) * np.array([1.0] * 4 + [40.0] * 4)  # some logvar past the clip
    post = DiagonalGaussian.from_moments(jnp.asarray(moments, jnp.float32))
    mean, logvar = moments[..., :4], np.clip(moments[..., 4:], -30.0, 20.0)
    var = np.exp(logvar)
    np.testing.assert_allclose(post.logvar, logvar, rtol=1e-6)
    np.testing.assert_allclose(post.std, np.sqrt(var), rtol=1e-5)
    np.testing.assert_allclose(post.mode(), mean, rtol=1e-6)

    kl_ref = 0.5 * np.sum(mean**2 + var - 1.0 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(), kl_ref, rtol=1e-5)
    other = DiagonalGaussian.from_moments(jnp.asarray(moments[::-1], jnp.float32))
    om, olv = mean[::-1], logvar[::-1]
    kl_other = 0.5 * np.sum((mean - om) ** 2 / np.exp(olv) + var / np.exp(olv) - 1.0 - logvar + olv, axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(other), kl_other, rtol=1e-5)

    x = rng.standard_normal(mean.shape)
    nll_ref = 0.5 * np.sum(np.log(2 * np.pi) + logvar + (x - mean) ** 2 / var, axis=(1, 2, 3))
    np.testing.assert_allclose(post.nll(jnp.asarray(x, jnp.float32)), nll_ref, rtol=1e-5)

    key = jax.random.key(3)
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    np.testing.assert_allclose(post.sample(key), mean + np.sqrt(var) * np.asarray(eps, np.float64),
                               rtol=1e-5, atol=1e-6)

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    ref = DiagonalGaussianDistribution(torch.from_numpy(moments.transpose(0, 3, 1, 2)))
    ref_other = DiagonalGaussianDistribution(torch.from_numpy(moments[::-1].transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(post.kl(), ref.kl().numpy(), rtol=1e-5)
    np.testing.assert_allclose(post.kl(other), ref.kl(ref_other).numpy(), rtol=1e-5)
    np.testing.assert_allclose(post.nll(jnp.asarray(x, jnp.float32)),
                               ref.nll(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy(), rtol=1e-5)


def test_posterior_samples_have_its_mean_and_std():
    mean = jnp.full((1, 64, 64, 4), 0.5)
    post = DiagonalGaussian(mean=mean, logvar=jnp.full_like(mean, np.log(0.25)))
    z = np.asarray(post.sample(jax.random.key(0)), np.float64)
    assert abs(z.mean() - 0.5) < 0.02 and abs(z.std() - 0.5) < 0.02


def test_sd_kl_f8_parameter_count():
    cfg = AutoencoderConfig()
    assert cfg.downsample_factor == 8
    shapes = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 83_653_863


def test_bf16_compute_keeps_f32_params():
    x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1, maxval=1)
    model = AutoencoderKL(TINY, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert {a.dtype for a in jax.tree.leaves(unbox(shapes))} == {jnp.dtype(jnp.float32)}
    params = flax_params_from_torch(random_torch_vae(TINY, 2), TINY, x)  # cheaper than compiling init
    out, ref = jax.jit(lambda p: (model.apply(p, x), AutoencoderKL(TINY).apply(p, x)))(params)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_config_round_trips_diffusers_json():
    d = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
         "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
         "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
         "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
    cfg = AutoencoderConfig.from_diffusers_config(d)
    assert cfg == AutoencoderConfig()
    out = cfg.to_diffusers_config()
    assert ({k: out[k] for k in d if k != "_diffusers_version"}
            == {k: v for k, v in d.items() if k != "_diffusers_version"})
    assert AutoencoderConfig.from_diffusers_config(out) == cfg


def test_config_rejects_unsupported_values():
    with pytest.raises(ValueError, match="down_block_types"):
        AutoencoderConfig.from_diffusers_config({"block_out_channels": [32, 64],
                                                 "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderConfig(block_out_channels=(30, 64), norm_num_groups=8)
    with pytest.raises(ValueError, match="in_channels"):
        AutoencoderKL(TINY).init(jax.random.key(0), jnp.zeros((1, 16, 16, 4)))
