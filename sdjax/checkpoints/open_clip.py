"""open_clip checkpoints (``open_clip_pytorch_model.bin`` / ``.safetensors``) as ``sdjax.models.clip.CLIPModel``
parameters: open_clip's names renamed by one table to transformers' ``CLIPModel`` names, which
``convert.torch_to_flax`` maps onto the modules. A transformers ``CLIPModel`` state dict reads as is.
"""

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.checkpoints.convert import torch_to_flax
from sdjax.checkpoints.tensors import read_tensors
from sdjax.models.clip import CLIPConfig, CLIPModel
from sdjax.models.layers import unbox

# open_clip name (regex) -> transformers CLIPModel name; "{tower}" is text_model or vision_model.
_BLOCK = (
    (r"ln_1\.", "layer_norm1."), (r"ln_2\.", "layer_norm2."), (r"mlp\.c_fc\.", "mlp.fc1."),
    (r"mlp\.c_proj\.", "mlp.fc2."), (r"attn\.out_proj\.", "self_attn.out_proj."),
)
_TOP = (
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (r"ln_final\.", "text_model.final_layer_norm."),
    (r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding"),
    (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    (r"visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"visual\.ln_post\.", "vision_model.post_layernorm."),
)
_PROJECTIONS = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_UNUSED = ("logit_scale", "logit_bias", "attn_mask")


def to_transformers_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """open_clip's state dict in transformers' ``CLIPModel`` names: ``in_proj`` split into q, k, v;
    the projections (applied as ``x @ P``) transposed to Linear weights; the logit scale dropped."""
    if any(k.startswith(("text_model.", "vision_model.")) for k in state):
        return {k: v for k, v in state.items() if k not in _UNUSED and not k.endswith("position_ids")}
    out = {}
    for key, value in state.items():
        if key in _UNUSED:
            continue
        if key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = np.ascontiguousarray(np.asarray(value).T)
            continue
        m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key)
        if m:
            prefix = f"{'vision_model' if m.group(1) else 'text_model'}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest.startswith("attn.in_proj_"):
                leaf = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0)):
                    out[f"{prefix}self_attn.{name}.{leaf}"] = part
                continue
            for pattern, new in _BLOCK:
                rest = re.sub(f"^{pattern}", new, rest)
            out[prefix + rest] = value
            continue
        for pattern, new in _TOP:
            if re.match(pattern, key):
                key = re.sub(f"^{pattern}", new, key)
                break
        out[key] = value
    return out


def load_clip(path: str, config: CLIPConfig = CLIPConfig(), allow_pickle: bool = False) -> dict[str, Any]:
    """``CLIPModel(config)`` parameters from an open_clip checkpoint (``.bin``/``.pt`` pickles only with
    ``allow_pickle``) or a transformers ``CLIPModel`` safetensors file. Raises CheckpointError naming
    every missing, unexpected or mis-shaped tensor (a config that does not match the file shows there)."""
    state = to_transformers_names(read_tensors(path, allow_pickle=allow_pickle))
    v, t = config.vision, config.text
    pixels = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, t.max_position_embeddings), jnp.int32)
    target = jax.eval_shape(CLIPModel(config).init, jax.random.key(0), pixels, ids)["params"]
    params = torch_to_flax(state, unbox(target), what=f"CLIP weights {path}")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
