"""Original single-file Stable Diffusion checkpoints (CompVis SD 1.x, Stability SD 2.x, SDXL) -> diffusers names.

An original checkpoint holds the whole latent diffusion model in one state dict:

    model.diffusion_model.*   the UNet (LDM ``openaimodel`` names; SDXL's ``label_emb`` too)
    first_stage_model.*       the autoencoder (LDM ``Encoder``/``Decoder`` names)
    cond_stage_model.*        the text encoder: HF CLIP-L (SD 1) or OpenCLIP ViT-H (SD 2)
    conditioner.embedders.*   SDXL's: HF CLIP-L at ``0.transformer`` and OpenCLIP ViT-bigG at
                              ``1.model`` (the refiner: ViT-bigG alone, at ``0.model``)

``split_original`` renames each part to the layout of the corresponding diffusers /
transformers weights file (``unet/``, ``vae/``, ``text_encoder/`` of a diffusers folder),
and ``infer_configs`` rebuilds their config.json dicts from tensor shapes, so the
single-file and the diffusers-folder loaders share everything downstream. ``join_original``
is the inverse (the single-file export). Both directions rename through the same tables
(``name_tables``). Numpy only.

What the shapes cannot tell and callers must supply: the prediction type (SD 2 768-v is
``v_prediction``), the image size, GroupNorm group counts (32 in every released SD
model) and head counts of models that do not use SD's conventions (see ``infer_configs``).
"""

from collections import Counter
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from sdjax.checkpoints.errors import CheckpointError
from sdjax.checkpoints.name_tables import UNetLayout, VAELayout, indices, open_clip_table, unet_table, vae_table

Version = Literal["v1", "v2", "xl", "xl_refiner"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1: transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2: OpenCLIP text tower
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L
XL_OPEN_CLIP_PREFIXES = {"xl": "conditioner.embedders.1.model.",  # SDXL: OpenCLIP ViT-bigG
                         "xl_refiner": "conditioner.embedders.0.model."}

SD1_UNET_HEADS = 8  # SD 1 (num_heads: 8 in v1-inference.yaml)
SD2_HEAD_DIM = 64  # SD 2 UNet (num_head_channels: 64) and both CLIP text towers
VAE_SCALING_FACTOR = 0.18215  # scale_factor of every SD 1.x / 2.x config
XL_VAE_SCALING_FACTOR = 0.13025  # SDXL's
XL_TIME_IDS = {"xl": 6, "xl_refiner": 5}  # micro-conditioning numbers: sizes and crop; the refiner's aesthetic score

# OpenCLIP tensors SD 2 does not use: the contrastive head.
_OPEN_CLIP_UNUSED = ("text_projection", "logit_scale")


def _prefix_summary(keys: Sequence[str], depth: int = 2, limit: int = 8) -> str:
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{p}.* ({n})" for p, n in counts.most_common(limit)) or "no keys"


def detect_version(keys: Sequence[str]) -> Version:
    """The SD version of an original checkpoint: "v1" (CLIP-L text encoder), "v2" (OpenCLIP ViT-H),
    "xl" (CLIP-L and OpenCLIP ViT-bigG) or "xl_refiner" (ViT-bigG alone)."""
    keys = list(keys)
    for version, prefix in XL_OPEN_CLIP_PREFIXES.items():
        if any(k.startswith(prefix) for k in keys):
            return version
    has_v1 = any(k.startswith(CLIP_PREFIX) for k in keys)
    has_v2 = any(k.startswith(OPEN_CLIP_PREFIX) for k in keys)
    if has_v1 != has_v2:
        return "v1" if has_v1 else "v2"
    if has_v1:
        raise CheckpointError(f"checkpoint holds both {CLIP_PREFIX}* (SD 1) and {OPEN_CLIP_PREFIX}* (SD 2) "
                              "text encoder weights; it is not a Stable Diffusion 1.x or 2.x checkpoint.")
    found = _prefix_summary(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        hint = ("It looks like SDXL (conditioner.embedders.*) but holds no OpenCLIP ViT-bigG text encoder "
                f"({XL_OPEN_CLIP_PREFIXES['xl']}* or {XL_OPEN_CLIP_PREFIXES['xl_refiner']}*).")
    elif keys and all(k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_", "time_embedding."))
                      for k in keys):
        hint = "It looks like a diffusers UNet weights file; load the whole diffusers folder instead."
    else:
        hint = "Expected a CompVis SD 1.x or Stability SD 2.x .safetensors/.ckpt file."
    raise CheckpointError(f"not a Stable Diffusion 1.x/2.x/XL single-file checkpoint: no {CLIP_PREFIX}* (SD 1), "
                          f"{OPEN_CLIP_PREFIX}* (SD 2) or conditioner.embedders.* (SDXL) text encoder keys. "
                          f"Found: {found}. {hint}")


def _strip(state_dict: Mapping[str, Any], prefix: str, what: str) -> dict[str, np.ndarray]:
    part = {k[len(prefix):]: np.asarray(v) for k, v in state_dict.items() if k.startswith(prefix)}
    if not part:
        raise CheckpointError(f"checkpoint has no {what} weights ({prefix}*). "
                              f"Found: {_prefix_summary(list(state_dict))}.")
    return part


def convert_unet(unet: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LDM ``openaimodel.UNetModel`` names (prefix removed) -> ``UNet2DConditionModel`` names."""
    return unet_table(UNetLayout.from_original(list(unet))).to_diffusers(unet, "UNet", UNET_PREFIX)


def convert_vae(vae: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LDM ``AutoencoderKL`` names (prefix removed) -> diffusers ``AutoencoderKL`` names."""
    return vae_table(VAELayout.from_original(list(vae))).to_diffusers(vae, "VAE", VAE_PREFIX)


def convert_clip(clip: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SD 1 ``cond_stage_model.transformer`` (prefix removed) -> ``text_model.*`` CLIPTextModel names.

    Older checkpoints lack the inner ``text_model.`` level; ``position_ids`` is a buffer, not a weight.
    """
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in clip.items() if not k.endswith("embeddings.position_ids")}


def convert_open_clip(clip: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SD 2 OpenCLIP text tower (prefix removed) -> ``text_model.*`` CLIPTextModel names.

    SD 2 conditions on the penultimate layer, so the last resblock is dropped (diffusers'
    SD 2 text encoder has 23 of OpenCLIP ViT-H's 24 layers), as is the contrastive head; the
    fused attention input projection is split into q/k/v.
    """
    blocks = indices(list(clip), r"transformer\.resblocks\.(\d+)\.")
    if not blocks:
        raise CheckpointError(f"SD 2 text encoder has no {OPEN_CLIP_PREFIX}transformer.resblocks.* layers.")
    last = f"transformer.resblocks.{blocks[-1]}."
    used = {k: v for k, v in clip.items() if not k.startswith(last) and k not in _OPEN_CLIP_UNUSED}
    return open_clip_table(blocks[-1]).to_diffusers(used, "text encoder", OPEN_CLIP_PREFIX)


def convert_big_g(clip: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """SDXL's OpenCLIP ViT-bigG (``prefix`` removed) -> ``CLIPTextModelWithProjection`` names: every layer
    (its pooled output conditions SDXL), the projection transposed; the logit scale is not used."""
    blocks = indices(list(clip), r"transformer\.resblocks\.(\d+)\.")
    if not blocks:
        raise CheckpointError(f"SDXL's second text encoder has no {prefix}transformer.resblocks.* layers.")
    used = {k: v for k, v in clip.items() if k != "logit_scale"}
    return open_clip_table(len(blocks), projection=True).to_diffusers(used, "text encoder 2", prefix)


def split_original(state_dict: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Split an original SD 1.x/2.x/XL checkpoint into ``{"unet", "vae", "text_encoder"}`` (SDXL: and
    ``text_encoder_2``; its refiner: without ``text_encoder``) diffusers state dicts.

    Values keep their dtype (numpy arrays; views where no copy is needed). Keys outside
    the models (noise-schedule buffers, ``model_ema.*``) are ignored.
    """
    version = detect_version(list(state_dict))
    parts = {"unet": convert_unet(_strip(state_dict, UNET_PREFIX, "UNet")),
             "vae": convert_vae(_strip(state_dict, VAE_PREFIX, "VAE"))}
    if version == "v1":
        parts["text_encoder"] = convert_clip(_strip(state_dict, CLIP_PREFIX, "text encoder"))
    elif version == "v2":
        parts["text_encoder"] = convert_open_clip(_strip(state_dict, OPEN_CLIP_PREFIX, "text encoder"))
    else:
        if version == "xl":
            parts["text_encoder"] = convert_clip(_strip(state_dict, XL_CLIP_PREFIX, "text encoder"))
        prefix = XL_OPEN_CLIP_PREFIXES[version]
        parts["text_encoder_2"] = convert_big_g(_strip(state_dict, prefix, "text encoder 2"), prefix)
    return parts


def _shape(part: Mapping[str, np.ndarray], key: str, what: str) -> tuple[int, ...]:
    if key not in part:
        raise CheckpointError(f"{what}: {key} is missing; cannot infer the model configuration.")
    return tuple(np.shape(part[key]))


def _heads_per_level(channels: list[int], version: Version, heads: int | Sequence[int] | None) -> int | list[int]:
    if heads is None:  # SD 1: 8 heads; SD 2 and SDXL: 64 channels per head
        heads = SD1_UNET_HEADS if version == "v1" else [c // SD2_HEAD_DIM for c in channels]
    per_level = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    if len(per_level) != len(channels) or any(h <= 0 or c % h for c, h in zip(channels, per_level)):
        raise CheckpointError(f"UNet attention heads {heads} do not fit block_out_channels {channels}; "
                              "pass unet_heads= (one count, or one per level) that divides each level's channels.")
    return heads if isinstance(heads, int) else per_level


def infer_unet_config(unet: Mapping[str, np.ndarray], version: Version, *, heads: int | Sequence[int] | None,
                      sample_size: int, norm_num_groups: int, pooled_dim: int | None = None) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config.json dict for a converted (diffusers-named) SD UNet; ``pooled_dim``:
    SDXL's second text encoder's projection width (the rest of its added embedding's input is
    ``XL_TIME_IDS`` sinusoidal embeddings)."""
    what = "UNet"
    keys = list(unet)
    levels = indices(keys, r"down_blocks\.(\d+)\.")
    layers = len(indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
    channels = [_shape(unet, f"down_blocks.{b}.resnets.0.conv2.weight", what)[0] for b in levels]
    has_attn = [f"down_blocks.{b}.attentions.0.proj_in.weight" in unet for b in levels]
    attn_levels = [b for b, a in zip(levels, has_attn) if a]
    if not attn_levels:
        raise CheckpointError("UNet has no cross-attention; not a Stable Diffusion UNet.")
    first = f"down_blocks.{attn_levels[0]}.attentions.0"
    # Transformer blocks per level (SDXL's differ; the mid block's is the last level's): a level without
    # attention says 1 unless every attending level agrees.
    blocks = lambda attention: len(indices(keys, rf"{attention}\.transformer_blocks\.(\d+)\."))  # noqa: E731
    depths = {b: blocks(f"down_blocks\\.{b}\\.attentions\\.0") for b in attn_levels}
    depths[levels[-1]] = blocks(r"mid_block\.attentions\.0")
    same = len(set(depths.values())) == 1
    depth = next(iter(depths.values())) if same else [depths.get(b, 1) for b in levels]
    added = {}
    if "add_embedding.linear_1.weight" in unet:
        width = _shape(unet, "add_embedding.linear_1.weight", what)[1]
        count = XL_TIME_IDS.get(version, 6)
        if pooled_dim is None or (width - pooled_dim) % count or width <= pooled_dim:
            raise CheckpointError(f"UNet: its added embedding reads {width} numbers, which is not the second text "
                                  f"encoder's {pooled_dim} plus {count} micro-conditioning embeddings.")
        added = {"addition_embed_type": "text_time", "addition_time_embed_dim": (width - pooled_dim) // count,
                 "projection_class_embeddings_input_dim": width}
    return {**added,
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": _shape(unet, "conv_in.weight", what)[1],
        "out_channels": _shape(unet, "conv_out.weight", what)[0],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "only_cross_attention": False,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": norm_num_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": _shape(unet, f"{first}.transformer_blocks.0.attn2.to_k.weight", what)[1],
        "transformer_layers_per_block": depth,
        "attention_head_dim": _heads_per_level(channels, version, heads),
        "use_linear_projection": len(_shape(unet, f"{first}.proj_in.weight", what)) == 2,
        "dual_cross_attention": False,
        "upcast_attention": False,
    }


def infer_vae_config(vae: Mapping[str, np.ndarray], *, sample_size: int, norm_num_groups: int) -> dict[str, Any]:
    """An ``AutoencoderKL`` config.json dict for a converted (diffusers-named) SD VAE."""
    what = "VAE"
    levels = indices(list(vae), r"encoder\.down_blocks\.(\d+)\.")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(vae, "encoder.conv_in.weight", what)[1],
        "out_channels": _shape(vae, "decoder.conv_out.weight", what)[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [_shape(vae, f"encoder.down_blocks.{b}.resnets.0.conv2.weight", what)[0] for b in levels],
        "layers_per_block": len(indices(list(vae), r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        "act_fn": "silu",
        "latent_channels": _shape(vae, "decoder.conv_in.weight", what)[1],
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": VAE_SCALING_FACTOR,
        "use_quant_conv": "quant_conv.weight" in vae,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
    }


def infer_text_config(text: Mapping[str, np.ndarray], version: Version, *, heads: int | None,
                      openai: bool | None = None) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` dict for a converted (``text_model.*``) SD text encoder; ``openai``:
    OpenAI's CLIP-L (quick_gelu) rather than an OpenCLIP tower (gelu), by default SD 1's."""
    what = "text encoder"
    vocab, hidden = _shape(text, "text_model.embeddings.token_embedding.weight", what)
    heads = hidden // SD2_HEAD_DIM if heads is None else heads
    if heads <= 0 or hidden % heads:
        raise CheckpointError(f"text encoder: {heads} heads do not divide hidden size {hidden}; pass text_heads=.")
    projection = {}
    if "text_projection.weight" in text:
        projection = {"architectures": ["CLIPTextModelWithProjection"],
                      "projection_dim": _shape(text, "text_projection.weight", what)[0]}
    openai = version == "v1" if openai is None else openai
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape(text, "text_model.encoder.layers.0.mlp.fc1.weight", what)[0],
        "num_hidden_layers": len(indices(list(text), r"text_model\.encoder\.layers\.(\d+)\.")),
        "num_attention_heads": heads,
        "max_position_embeddings": _shape(text, "text_model.embeddings.position_embedding.weight", what)[0],
        "hidden_act": "quick_gelu" if openai else "gelu",
        "layer_norm_eps": 1e-5,
        **projection,
    }


def infer_configs(state_dict: Mapping[str, Any], *, image_size: int | None = None, norm_num_groups: int = 32,
                  unet_heads: int | Sequence[int] | None = None, text_heads: int | None = None,
                  parts: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """diffusers-style ``{"unet", "vae", "text_encoder"}`` configs (SDXL: and ``text_encoder_2`` and its
    pipeline's flags) for an original SD 1.x/2.x/XL checkpoint.

    Inferred from shapes: channels, levels, layers per block, which levels attend and how deep,
    cross-attention width, linear vs conv transformer projections (SD 2 vs SD 1), SDXL's added
    embedding, text width/depth/MLP/vocab/positions/projection. Fixed by SD convention unless
    overridden: UNet heads (SD 1: 8 per level; SD 2, SDXL: channels / 64), text heads (hidden / 64),
    text activation (CLIP-L quick_gelu, OpenCLIP gelu), SDXL's VAE scale 0.13025. Not in the weights at
    all: ``image_size`` (512, SDXL 1024; 768 for SD 2 768-v), ``norm_num_groups`` (32 in every SD
    release), and the prediction type, which the caller must pass to the scheduler. ``parts``:
    ``split_original(state_dict)`` when the caller already has it.
    """
    version = detect_version(list(state_dict))
    parts = split_original(state_dict) if parts is None else parts
    xl = version in XL_OPEN_CLIP_PREFIXES
    image_size = image_size or (1024 if xl else 512)
    vae = infer_vae_config(parts["vae"], sample_size=image_size, norm_num_groups=norm_num_groups)
    latent_size = image_size // 2 ** (len(vae["block_out_channels"]) - 1)
    texts = {name: infer_text_config(parts[name], version, heads=text_heads,
                                     openai=name == "text_encoder" if xl else None)
             for name in ("text_encoder", "text_encoder_2") if name in parts}
    pooled = texts["text_encoder_2"]["projection_dim"] if xl else None
    configs = {"unet": infer_unet_config(parts["unet"], version, heads=unet_heads, sample_size=latent_size,
                                         norm_num_groups=norm_num_groups, pooled_dim=pooled),
               "vae": vae, **texts}
    if xl:
        vae["scaling_factor"] = XL_VAE_SCALING_FACTOR
        configs.update(force_zeros_for_empty_prompt=version == "xl", requires_aesthetics_score=version == "xl_refiner")
    return configs


# ---- the inverse: diffusers names -> one original checkpoint (the single-file export) ----------------

def unet_to_original(unet: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``UNet2DConditionModel`` names -> LDM ``UNetModel`` names (without ``model.diffusion_model.``)."""
    return unet_table(UNetLayout.from_diffusers(list(unet))).to_original(unet, "UNet (diffusers names)")


def vae_to_original(vae: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``AutoencoderKL`` names -> LDM autoencoder names (without ``first_stage_model.``); the mid-block
    attention projections become 1x1 convs as in the originals."""
    return vae_table(VAELayout.from_diffusers(list(vae))).to_original(vae, "VAE (diffusers names)")


def clip_to_original(text: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``CLIPTextModel`` (``text_model.*``) -> SD 1 ``cond_stage_model.transformer`` names (without the
    prefix), with the ``position_ids`` buffer the originals carry."""
    out = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text.items()}
    positions = out["text_model.embeddings.position_embedding.weight"].shape[0]
    out["text_model.embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
    return out


def open_clip_to_original(text: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``CLIPTextModel`` (``text_model.*``) -> SD 2 OpenCLIP names (without ``cond_stage_model.model.``).

    q/k/v are fused into ``in_proj``. An original SD 2 file also holds what SD 2 never uses (it
    reads the penultimate layer): a final resblock, the text projection and the logit scale.
    sdjax does not keep them, so they are written as an identity block (zero projections, so the
    residual stream passes through), an identity projection and CLIP's ln(100), and loaders that
    expect them find them.
    """
    text = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text.items()}
    last = len(indices(list(text), r"text_model\.encoder\.layers\.(\d+)\."))
    out = open_clip_table(last).to_original(text, "text encoder (CLIPTextModel names)")
    for key, value in list(out.items()):
        if key.startswith("transformer.resblocks.0."):
            is_norm_scale = key.endswith(("ln_1.weight", "ln_2.weight"))
            out[key.replace("resblocks.0.", f"resblocks.{last}.", 1)] = (
                np.ones_like(value) if is_norm_scale else np.zeros_like(value))
    hidden = out["token_embedding.weight"].shape[1]
    dtype = out["token_embedding.weight"].dtype
    out["text_projection"] = np.eye(hidden, dtype=dtype)
    out["logit_scale"] = np.asarray(np.log(100.0), dtype=dtype)
    return out


def big_g_to_original(text: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``CLIPTextModelWithProjection`` names -> SDXL's OpenCLIP ViT-bigG names (without the prefix), q/k/v
    fused, the projection transposed, and CLIP's ln(100) logit scale, which the originals carry."""
    layers = len(indices(list(text), r"text_model\.encoder\.layers\.(\d+)\."))
    out = open_clip_table(layers, projection=True).to_original(text, "text encoder 2 (transformers names)")
    out["logit_scale"] = np.asarray(np.log(100.0), dtype=out["token_embedding.weight"].dtype)
    return out


def version_of(hidden_act: str, sdxl: bool = False, refiner: bool = False) -> Version:
    """The original layout a model belongs to: SDXL's (its refiner's), else by its text encoder's
    activation, CLIP-L (quick_gelu, SD 1) or OpenCLIP (gelu, SD 2)."""
    if sdxl:
        return "xl_refiner" if refiner else "xl"
    return "v1" if hidden_act == "quick_gelu" else "v2"


def join_original(states: Mapping[str, Mapping[str, np.ndarray]], version: Version) -> dict[str, np.ndarray]:
    """One original SD 1.x (``version="v1"``), 2.x (``"v2"``) or XL (``"xl"``, ``"xl_refiner"``) state
    dict from diffusers-named ``{"unet", "vae", "text_encoder", "text_encoder_2"}`` state dicts;
    ``split_original`` reads it back."""
    if version in XL_OPEN_CLIP_PREFIXES:
        text = {XL_OPEN_CLIP_PREFIXES[version] + k: v for k, v in big_g_to_original(states["text_encoder_2"]).items()}
        if version == "xl":
            text.update({XL_CLIP_PREFIX + k: v for k, v in clip_to_original(states["text_encoder"]).items()})
    elif version == "v1":
        text = {CLIP_PREFIX + k: v for k, v in clip_to_original(states["text_encoder"]).items()}
    else:
        text = {OPEN_CLIP_PREFIX + k: v for k, v in open_clip_to_original(states["text_encoder"]).items()}
    return {**{UNET_PREFIX + k: v for k, v in unet_to_original(states["unet"]).items()},
            **{VAE_PREFIX + k: v for k, v in vae_to_original(states["vae"]).items()},
            **text}
