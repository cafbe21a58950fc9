"""Test helper: diffusers state dicts -> an original (CompVis SD 1 / Stability SD 2) single-file checkpoint.

The inverse of ``sdjax.checkpoints.single_file``; tests check it against diffusers' own
single-file converters before trusting it as a fixture.
"""

import re
from typing import Any, Literal, Mapping

import numpy as np
from safetensors.numpy import save_file

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """numpy copies of a torch or numpy state dict."""
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).copy()
            for k, v in state_dict.items()}


def with_text_model_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextModel keys as in a diffusers text_encoder/ weights file (transformers >= 5.6 drops ``text_model.``)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state_dict.items()}


def _sub(name: str, table: Mapping[str, str]) -> str:
    for new, old in table.items():
        if name.startswith(new + "."):
            return old + name[len(new):]
    return name


def unet_to_original(unet: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """UNet2DConditionModel names -> LDM UNetModel names (without ``model.diffusion_model.``)."""
    layers = 1 + max(int(m.group(1)) for k in unet if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    up_attn = {int(m.group(1)) for k in unet if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, v in unet.items():
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block = 1 + int(m.group(1)) * (layers + 1) + int(m.group(3))
            if m.group(2) == "resnets":
                new = f"input_blocks.{block}.0.{_sub(m.group(4), UNET_RESNET)}"
            else:
                new = f"input_blocks.{block}.1.{m.group(4)}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m.group(1)) + 1) * (layers + 1)}.0.op.{m.group(2)}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"middle_block.{2 * int(m.group(1))}.{_sub(m.group(2), UNET_RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m.group(1)}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block = int(m.group(1)) * (layers + 1) + int(m.group(3))
            if m.group(2) == "resnets":
                new = f"output_blocks.{block}.0.{_sub(m.group(4), UNET_RESNET)}"
            else:
                new = f"output_blocks.{block}.1.{m.group(4)}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(m.group(1))
            slot = 2 if level in up_attn else 1
            new = f"output_blocks.{level * (layers + 1) + layers}.{slot}.conv.{m.group(2)}"
        else:
            new = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                   "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[key.rsplit(".", 1)[0]]
            new = f"{new}.{key.rsplit('.', 1)[1]}"
        out[new] = v
    return out


def vae_to_original(vae: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """AutoencoderKL names -> LDM autoencoder names (without ``first_stage_model.``), attention as 1x1 convs."""
    num_up = 1 + max(int(m.group(1)) for k in vae if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, v in vae.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", new):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", new):
            new = f"encoder.down.{m.group(1)}.downsample.{m.group(2)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", new):
            new = f"decoder.up.{num_up - 1 - int(m.group(1))}.block.{m.group(2)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", new):
            new = f"decoder.up.{num_up - 1 - int(m.group(1))}.upsample.{m.group(2)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", new):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", new):
            new = f"{m.group(1)}.mid.attn_1.{_sub(m.group(2), VAE_ATTN)}"
            if v.ndim == 2:
                v = v[:, :, None, None]
        out[new] = v
    return out


def clip_to_original(text: Mapping[str, np.ndarray], *, inner_text_model: bool = True) -> dict[str, np.ndarray]:
    """CLIPTextModel -> SD 1 ``cond_stage_model.transformer`` names (without the prefix), with position_ids."""
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    positions = text["embeddings.position_embedding.weight"].shape[0]
    text["embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
    return {(f"text_model.{k}" if inner_text_model else k): v for k, v in text.items()}


def open_clip_to_original(text: Mapping[str, np.ndarray], *, seed: int = 0) -> dict[str, np.ndarray]:
    """CLIPTextModel -> SD 2 OpenCLIP names (without ``cond_stage_model.model.``).

    Adds what a real SD 2 file has and SD 2 does not use: one more (final) resblock, the
    text projection and logit scale, all random.
    """
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    out, fused = {}, {}
    for key, v in text.items():
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[key]] = v
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)", key)
        n, rest = m.group(1), m.group(2)
        if q := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            fused.setdefault((n, q.group(2)), {})[q.group(1)] = v
        else:
            out[f"transformer.resblocks.{n}.{_sub(rest, OPEN_CLIP_BLOCK)}"] = v
    for (n, leaf), qkv in fused.items():
        out[f"transformer.resblocks.{n}.attn.in_proj_{leaf}"] = np.concatenate([qkv["q"], qkv["k"], qkv["v"]])
    rng = np.random.default_rng(seed)
    last = 1 + max(int(n) for n, _ in fused)
    for key, v in list(out.items()):
        if key.startswith("transformer.resblocks.0."):
            extra = key.replace("resblocks.0.", f"resblocks.{last}.", 1)
            out[extra] = rng.standard_normal(v.shape).astype(v.dtype)
    hidden = text["embeddings.token_embedding.weight"].shape[1]
    out["text_projection"] = rng.standard_normal((hidden, hidden)).astype(np.float32)
    out["logit_scale"] = np.asarray(4.6052, dtype=np.float32)
    return out


def to_original(unet: Mapping[str, Any], vae: Mapping[str, Any], text_encoder: Mapping[str, Any], *,
                version: Literal["v1", "v2"], inner_text_model: bool = True) -> dict[str, np.ndarray]:
    """One original-layout state dict, with the noise-schedule buffers real checkpoints carry."""
    text = with_text_model_prefix(to_numpy(text_encoder))
    if version == "v1":
        cond = {f"cond_stage_model.transformer.{k}": v
                for k, v in clip_to_original(text, inner_text_model=inner_text_model).items()}
    else:
        cond = {f"cond_stage_model.model.{k}": v for k, v in open_clip_to_original(text).items()}
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return {
        **{f"model.diffusion_model.{k}": v for k, v in unet_to_original(to_numpy(unet)).items()},
        **{f"first_stage_model.{k}": v for k, v in vae_to_original(to_numpy(vae)).items()},
        **cond,
        "betas": betas.astype(np.float32),
        "alphas_cumprod": np.cumprod(1 - betas).astype(np.float32),
    }


def write_original(path: str, unet: Mapping[str, Any], vae: Mapping[str, Any], text_encoder: Mapping[str, Any], *,
                   version: Literal["v1", "v2"], inner_text_model: bool = True) -> dict[str, np.ndarray]:
    """Write ``to_original(...)`` to ``path`` as .safetensors and return it."""
    state = to_original(unet, vae, text_encoder, version=version, inner_text_model=inner_text_model)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    return state
