"""Test helper: diffusers state dicts -> an original (CompVis SD 1 / Stability SD 2) single-file checkpoint.

Built on ``sdjax.checkpoints.single_file.join_original`` (the single-file export), with what real
files carry on top: random weights in SD 2's unused final OpenCLIP block and text projection,
and the noise-schedule buffers. ``tests/test_single_file.py`` checks the result against
diffusers' own single-file converters before the other tests trust it as a fixture.
"""

from typing import Any, Literal, Mapping

import numpy as np
from safetensors.numpy import save_file

from sdjax.checkpoints.single_file import OPEN_CLIP_PREFIX, join_original


def to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """numpy copies of a torch or numpy state dict."""
    return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).copy()
            for k, v in state_dict.items()}


def with_text_model_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextModel keys as in a diffusers text_encoder/ weights file (transformers >= 5.6 drops ``text_model.``)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state_dict.items()}


def to_original(unet: Mapping[str, Any], vae: Mapping[str, Any], text_encoder: Mapping[str, Any], *,
                version: Literal["v1", "v2"], inner_text_model: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """One original-layout state dict as released files hold it."""
    states = {"unet": to_numpy(unet), "vae": to_numpy(vae),
              "text_encoder": with_text_model_prefix(to_numpy(text_encoder))}
    state = join_original(states, version)
    rng = np.random.default_rng(seed)
    if version == "v2":  # what SD 2 never reads is random in a real file, not the identity sdjax writes
        blocks = {int(k.split(".")[4]) for k in state if k.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks.")}
        last = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{max(blocks)}."
        for key in [k for k in state if k.startswith(last)] + [OPEN_CLIP_PREFIX + "text_projection"]:
            state[key] = rng.standard_normal(state[key].shape).astype(state[key].dtype)
    if not inner_text_model:  # older SD 1 files: cond_stage_model.transformer.embeddings.*
        state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                 for k, v in state.items()}
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    state["betas"] = betas.astype(np.float32)
    state["alphas_cumprod"] = np.cumprod(1 - betas).astype(np.float32)
    return state


def write_original(path: str, unet: Mapping[str, Any], vae: Mapping[str, Any], text_encoder: Mapping[str, Any], *,
                   version: Literal["v1", "v2"], inner_text_model: bool = True) -> dict[str, np.ndarray]:
    """Write ``to_original(...)`` to ``path`` as .safetensors and return it."""
    state = to_original(unet, vae, text_encoder, version=version, inner_text_model=inner_text_model)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    return state
