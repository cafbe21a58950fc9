"""Original single-file SD 1/2 checkpoints -> diffusers state dicts and configs, against diffusers' own converters."""

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel

from sdjax.checkpoints.errors import CheckpointError
from sdjax.checkpoints.single_file import detect_version, infer_configs, split_original
from single_file_fixtures import to_numpy, to_original, with_text_model_prefix, write_original

TINY = {
    # SD 1 layout: conv proj_in/out, 8 heads everywhere, last level without attention, quick_gelu CLIP.
    "v1": dict(
        unet=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8),
        vae=dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  vocab_size=1000, max_position_embeddings=77, hidden_act="quick_gelu"),
        norm_num_groups=8),
    # SD 2 layout: linear proj_in/out, 64-channel heads (SD 2's rule, so nothing to override), gelu OpenCLIP
    # with 23 used layers, so diffusers' hard-coded SD 2 ignore list (resblocks.23) applies exactly.
    "v2": dict(
        unet=dict(sample_size=16, block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=16,
                  down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                  cross_attention_dim=32, attention_head_dim=(1, 2), use_linear_projection=True),
        vae=dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=16,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text=dict(hidden_size=32, num_hidden_layers=23, num_attention_heads=4, intermediate_size=64,
                  vocab_size=1000, max_position_embeddings=77, hidden_act="gelu"),
        norm_num_groups=16),
}
TEXT_HEADS = 4  # hidden 32 / 64 would give 0: the tiny text encoders need the hint


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct random values everywhere (default init leaves norms at 1/0, hiding swapped keys)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", params=["v1", "v2"])
def sd(request, tmp_path_factory):
    version = request.param
    tiny = TINY[version]
    unet = _randomize(UNet2DConditionModel(**tiny["unet"]), 0)
    vae = _randomize(AutoencoderKL(**tiny["vae"]), 1)
    text = _randomize(CLIPTextModel(CLIPTextConfig(**tiny["text"])), 2)
    path = str(tmp_path_factory.mktemp(version) / "sd.safetensors")
    write_original(path, unet.state_dict(), vae.state_dict(), text.state_dict(), version=version)
    expected = {"unet": to_numpy(unet.state_dict()), "vae": to_numpy(vae.state_dict()),
                "text_encoder": with_text_model_prefix(to_numpy(text.state_dict()))}
    return dict(version=version, path=path, unet=unet, vae=vae, text=text, expected=expected)


def assert_same_state(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.shape == w.shape and g.dtype == w.dtype, k
        np.testing.assert_array_equal(g, w, err_msg=k)


def test_fixture_matches_diffusers_converters(sd):
    """The fixture writer is the inverse of diffusers' single-file converters."""
    ckpt = safetensors.torch.load_file(sd["path"])
    expected = sd["expected"]
    # Layout facts diffusers' converters accept either way: LDM's Upsample follows the level's last
    # ResBlock (slot 1) or ResBlock + SpatialTransformer (slot 2), as in SD 1.5's output_blocks.2.1.conv /
    # output_blocks.5.2.conv; the VAE attention projections are 1x1 convs.
    upsampler = "output_blocks.2.1.conv.weight" if sd["version"] == "v1" else "output_blocks.1.2.conv.weight"
    assert f"model.diffusion_model.{upsampler}" in ckpt
    assert ckpt["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 4
    assert_same_state(to_numpy(convert_ldm_unet_checkpoint(ckpt, dict(sd["unet"].config))), expected["unet"])
    assert_same_state(to_numpy(convert_ldm_vae_checkpoint(ckpt, dict(sd["vae"].config))), expected["vae"])
    if sd["version"] == "v1":
        text = to_numpy(convert_ldm_clip_checkpoint(ckpt))
        np.testing.assert_array_equal(text.pop("text_model.embeddings.position_ids"), np.arange(77)[None])
    else:
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in ckpt  # the unused layer
        text = to_numpy(convert_open_clip_checkpoint(sd["text"], ckpt))
    assert_same_state(text, expected["text_encoder"])


def test_split_original_recovers_diffusers_state_dicts(sd):
    parts = split_original(safetensors.numpy.load_file(sd["path"]))
    assert sorted(parts) == ["text_encoder", "unet", "vae"]
    for name, want in sd["expected"].items():
        assert_same_state(parts[name], want)


@pytest.mark.parametrize("sd", ["v1"], indirect=True)  # the outer-only CLIP layout exists for SD 1 only
def test_split_original_v1_without_inner_text_model_and_fp16(sd):
    state = to_original(sd["unet"].state_dict(), sd["vae"].state_dict(), sd["text"].state_dict(), version="v1",
                        inner_text_model=False)
    assert not any(k.startswith("cond_stage_model.transformer.text_model.") for k in state)
    parts = split_original({k: v.astype(np.float16) for k, v in state.items()})
    for name, want in sd["expected"].items():
        assert_same_state(parts[name], {k: v.astype(np.float16) for k, v in want.items()})


def _as_lists(value):
    return list(value) if isinstance(value, tuple) else value


def test_infer_configs_match_models(sd):
    version, tiny = sd["version"], TINY[sd["version"]]
    configs = infer_configs(safetensors.numpy.load_file(sd["path"]), image_size=tiny["vae"]["sample_size"],
                            norm_num_groups=tiny["norm_num_groups"], text_heads=TEXT_HEADS)
    parts = split_original(safetensors.numpy.load_file(sd["path"]))

    unet = UNet2DConditionModel.from_config(configs["unet"])
    for field in ("sample_size", "in_channels", "out_channels", "down_block_types", "mid_block_type",
                  "up_block_types", "block_out_channels", "layers_per_block", "norm_num_groups", "norm_eps",
                  "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                  "use_linear_projection", "act_fn", "flip_sin_to_cos", "freq_shift", "upcast_attention"):
        assert _as_lists(unet.config[field]) == _as_lists(sd["unet"].config[field]), field
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in parts["unet"].items()}, strict=True)

    vae = AutoencoderKL.from_config(configs["vae"])
    for field in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                  "layers_per_block", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
                  "use_quant_conv", "use_post_quant_conv", "act_fn"):
        assert _as_lists(vae.config[field]) == _as_lists(sd["vae"].config[field]), field
    vae.load_state_dict({k: torch.from_numpy(v) for k, v in parts["vae"].items()}, strict=True)

    text_config = CLIPTextConfig(**configs["text_encoder"])
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "hidden_act", "layer_norm_eps"):
        assert getattr(text_config, field) == getattr(sd["text"].config, field), field
    text = CLIPTextModel(text_config)
    text.load_state_dict({k.removeprefix("text_model."): torch.from_numpy(v)
                          for k, v in parts["text_encoder"].items()}, strict=True)
    assert configs["text_encoder"]["hidden_act"] == ("quick_gelu" if version == "v1" else "gelu")


def test_infer_configs_sd_conventions(sd):
    """Without hints: SD 1 UNets get 8 heads, SD 2 UNets channels/64, text encoders hidden/64."""
    state = safetensors.numpy.load_file(sd["path"])
    with pytest.raises(CheckpointError, match="0 heads do not divide hidden size 32; pass text_heads="):
        infer_configs(state)  # the tiny text encoder is narrower than one 64-wide head
    configs = infer_configs(state, text_heads=TEXT_HEADS)
    assert configs["unet"]["attention_head_dim"] == (8 if sd["version"] == "v1" else [1, 2])
    assert configs["unet"]["sample_size"] == 256 and configs["vae"]["sample_size"] == 512
    assert configs["unet"]["norm_num_groups"] == configs["vae"]["norm_num_groups"] == 32
    with pytest.raises(CheckpointError, match="pass unet_heads="):
        infer_configs(state, text_heads=TEXT_HEADS, unet_heads=(3, 3))


def test_detect_version(sd):
    keys = list(safetensors.numpy.load_file(sd["path"]))
    assert detect_version(keys) == sd["version"]


@pytest.mark.parametrize("keys, message", [
    (["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
      "model.diffusion_model.input_blocks.0.0.weight"], "SDXL"),
    (["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"], "diffusers UNet"),
    (["encoder.layer.0.weight", "encoder.layer.1.weight", "pooler.bias"], r"encoder\.layer\.\* \(2\)"),
    (["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
      "cond_stage_model.model.token_embedding.weight"], "both"),
    ([], "no keys"),
])
def test_detect_version_rejects_other_checkpoints(keys, message):
    with pytest.raises(CheckpointError, match=message):
        detect_version(keys)


def test_split_original_names_unknown_and_missing_keys(sd):
    state = safetensors.numpy.load_file(sd["path"])
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.extra_emb\.0\.0\.weight"):
        split_original({**state, "model.diffusion_model.extra_emb.0.0.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"no VAE weights \(first_stage_model\.\*\)"):
        split_original({k: v for k, v in state.items() if not k.startswith("first_stage_model.")})
