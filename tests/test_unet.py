"""UNet: parity with diffusers' UNet2DConditionModel, published parameter counts, config I/O,
bf16 compute and rematerialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from sdjax.checkpoints.convert import torch_to_flax
from sdjax.models.configs import abstract_module_params, count_params, unet_inputs
from sdjax.models.layers import unbox
from sdjax.models.unet import AddedCond, UNet, UNetConfig

SD15_CONFIG = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_CONFIG = {  # stabilityai/stable-diffusion-2-1 unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True, "use_linear_projection": True,
}

TINY_SD1 = UNetConfig(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)
TINY_SD2 = UNetConfig(
    sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 8), cross_attention_dim=24, norm_num_groups=16, use_linear_projection=True,
    upcast_attention=True, transformer_layers_per_block=(1, 2, 1), only_cross_attention=(False, True, False),
    freq_shift=1, flip_sin_to_cos=False)


def _param_count(cfg: UNetConfig) -> int:
    return count_params(abstract_module_params(UNet(cfg), unet_inputs(cfg)))


def _inputs(cfg: UNetConfig, batch: int = 2, ctx_len: int = 7):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 8, 8, cfg.in_channels), dtype=np.float32)
    t = np.array([3.0, 917.0][:batch], dtype=np.float32)
    ctx = rng.standard_normal((batch, ctx_len, cfg.cross_attention_dim), dtype=np.float32)
    return x, t, ctx


@pytest.mark.parametrize("cfg", [TINY_SD1, TINY_SD2], ids=["sd1", "sd2"])
def test_output_matches_diffusers_unet2dconditionmodel(cfg):
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**cfg.to_diffusers_config()).eval()
    with torch.no_grad():  # norms init to 1/0: randomise them so a swapped mapping cannot pass
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                   torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()

    model = UNet(cfg)
    target = unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, ctx))["params"]
    params = torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, target, what="unet")
    got = jax.jit(model.apply)({"params": params}, x, t, ctx)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


SDXL_BASE_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the keys that differ from SD's
    **SD21_CONFIG, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None}
SDXL_REFINER_CONFIG = {  # stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json, likewise
    **SDXL_BASE_CONFIG, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


# SDXL's counts: diffusers' UNet2DConditionModel built from the same config on torch's meta device.
@pytest.mark.parametrize("d, count", [(SD15_CONFIG, 859_520_964), (SD21_CONFIG, 865_910_724),
                                      (SDXL_BASE_CONFIG, 2_567_463_684), (SDXL_REFINER_CONFIG, 2_259_526_660)],
                         ids=["sd15", "sd21", "sdxl", "sdxl_refiner"])
def test_published_parameter_counts(d, count):
    assert _param_count(UNetConfig.from_diffusers_config(d)) == count


def test_config_round_trip_and_head_naming():
    cfg = UNetConfig.from_diffusers_config(SD21_CONFIG)
    assert cfg.heads == (5, 10, 20, 20) and cfg.use_linear_projection and cfg.cross_attention_dim == 1024
    assert UNetConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    explicit = UNetConfig.from_diffusers_config({**SD15_CONFIG, "num_attention_heads": 4})
    assert explicit.heads == (4,) * 4
    assert UNetConfig.from_diffusers_config(explicit.to_diffusers_config()).heads == (4,) * 4


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "image"), ("class_embed_type", "timestep"), ("dual_cross_attention", True),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("norm_num_groups", None), ("no_such_option", 1)])
def test_unsupported_features_are_named(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_diffusers_config({**SD15_CONFIG, key: value})


def test_bad_inputs_raise_before_compute():
    model = UNet(TINY_SD2)
    with pytest.raises(ValueError, match="divisible by 4"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 6, 8, 4)), 0, jnp.zeros((1, 3, 24)))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), 0, jnp.zeros((1, 3, 32)))


def test_bf16_compute_and_remat():
    cfg = UNetConfig(block_out_channels=(16,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                     up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=2, cross_attention_dim=8,
                     norm_num_groups=8)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 4, 4), dtype=np.float32)
    ctx = rng.standard_normal((1, 3, 8), dtype=np.float32)
    shapes = unbox(jax.eval_shape(UNet(cfg).init, jax.random.key(0), x, 5.0, ctx))
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1))
                          .astype(np.float32), shapes)
    remat_shapes = unbox(jax.eval_shape(UNet(cfg, remat=True).init, jax.random.key(0), x, 5.0, ctx))
    assert jax.tree.map(lambda s: s.shape, remat_shapes) == jax.tree.map(lambda s: s.shape, shapes)

    def loss(p, remat):
        return jnp.mean(UNet(cfg, remat=remat).apply(p, x, 5.0, ctx) ** 2)

    plain, remat = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, r) for r in (False, True))
    # Recomputing the forward pass lets XLA order sums differently (how, depends on the host's CPU
    # and XLA's flags): gradients are held to 1e-4 of their leaf's largest; a wrong recomputation
    # would be off by the gradient's own size.
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()),
                 remat[1], plain[1])

    out = jax.jit(UNet(cfg, dtype=jnp.bfloat16).apply)(params, x, 5.0, ctx)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.mean(out ** 2), plain[0], rtol=0.05)


TINY_SDXL = UNetConfig(  # SDXL's layout: no attention at the top level, uneven transformer depth, text_time
    sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8), cross_attention_dim=40, norm_num_groups=16, use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 3), addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8)


def test_sdxl_unet_matches_diffusers_with_text_time_conditioning():
    """SDXL's UNet: the pooled text embedding and six micro-conditioning numbers reach the output as
    in diffusers, and other numbers give another output."""
    cfg = TINY_SDXL
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**cfg.to_diffusers_config()).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    x, t, ctx = _inputs(cfg)
    rng = np.random.default_rng(1)
    text = rng.standard_normal((2, 24), dtype=np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 1024, 896]], np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx),
                   added_cond_kwargs={"text_embeds": torch.from_numpy(text), "time_ids": torch.from_numpy(time_ids)}
                   ).sample.permute(0, 2, 3, 1).numpy()

    model = UNet(cfg)
    added = AddedCond(text, time_ids)
    target = unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, added))["params"]
    params = torch_to_flax({k: v.numpy() for k, v in ref.state_dict().items()}, target, what="unet")
    apply = jax.jit(model.apply)
    got = apply({"params": params}, x, t, ctx, added)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    other = apply({"params": params}, x, t, ctx, AddedCond(text, time_ids[::-1]))
    assert np.abs(np.asarray(other) - np.asarray(got)).max() > 1e-2

    with pytest.raises(ValueError, match="needs `added`"):
        jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)
    with pytest.raises(ValueError, match="refiner: 5"):
        jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, AddedCond(text, time_ids[:, :5]))
