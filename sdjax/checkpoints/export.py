"""Writing a whole model in the formats the rest of the world reads.

``save(path, configs, params, tokenizer_dir, format=...)``:

    sdjax         Orbax params + JSON configs (``sdjax_format``): loads back bit-exact, the default
    diffusers     a diffusers pipeline folder (``StableDiffusionPipeline``, or
                  ``StableDiffusionInpaintPipeline`` for a 9-channel UNet), safetensors weights
    single_file   one ``.safetensors`` file in the original CompVis / Stability layout that A1111,
                  ComfyUI and diffusers' single-file loader read (SD 1 layout for a CLIP-L style
                  text encoder, SD 2's OpenCLIP layout otherwise)

``dtype`` (e.g. ``jnp.float16``) writes a half-precision copy. Every format is written to a
temporary path and moved into place whole.
"""

from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from sdjax.checkpoints import atomic, diffusers_folder, sdjax_format, single_file
from sdjax.checkpoints.convert import flax_to_torch, text_encoder_to_torch
from sdjax.checkpoints.formats import VAE_FORMATS, check_format
from sdjax.models.autoencoder import AutoencoderConfig
from sdjax.models.configs import TEXT_ENCODERS, ModelConfigs
from sdjax.tokenizer import load_tokenizer

def torch_state_dicts(params: dict[str, Any], dtype: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """PyTorch-layout (diffusers / transformers names) state dicts of ``{"unet", "vae", "text_encoder"}``
    (and SDXL's ``text_encoder_2``)."""
    out = {"unet": flax_to_torch(params["unet"], dtype), "vae": flax_to_torch(params["vae"], dtype)}
    out.update({name: text_encoder_to_torch(params[name], dtype)
                for name in TEXT_ENCODERS if name in params})
    return out


def save(path: str, configs: ModelConfigs, params: dict[str, Any], tokenizer_dir: str | None = None, *,
         format: str = "sdjax", dtype: Any = None, tokenizer_2_dir: str | None = None) -> None:
    """Writes the model to ``path`` in ``format`` (see the module docstring); ``tokenizer_2_dir``: SDXL's
    second tokenizer."""
    check_format(format)
    if format == "sdjax":
        cast = params if dtype is None else jax.tree_util.tree_map(lambda a: np.asarray(a).astype(dtype), params)
        sdjax_format.save(path, configs.to_dicts(), cast, tokenizer_dir, tokenizer_2_dir)
        return
    params = jax.device_get(params)
    if format == "diffusers":
        dicts = configs.to_dicts()
        tokenizers = {}
        for name, folder, text in (("tokenizer", tokenizer_dir, dicts.get("text_encoder")),
                                   ("tokenizer_2", tokenizer_2_dir, dicts.get("text_encoder_2"))):
            if text is None:
                continue
            if folder is None:
                raise ValueError(f"a diffusers folder needs the model's {name} and this model has none: load it "
                                 "with tokenizer=DIR (a folder with vocab.json and merges.txt), or from a folder "
                                 f"that has {name}/.")
            tokenizer = load_tokenizer(folder)
            tokenizer.model_max_length = text["max_position_embeddings"]  # diffusers pads prompts to this length
            if max(text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) >= text["vocab_size"]:
                # a text encoder trained on its own small vocabulary: its special tokens are the tokenizer's
                text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
            tokenizers[name] = (tokenizer, folder)
        diffusers_folder.write_pipeline(path, dicts, torch_state_dicts(params, dtype), tokenizers)
        return
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"{path}: a single-file export is one .safetensors file; name it e.g. model.safetensors.")
    version = single_file.version_of(configs.text_encoder.hidden_act if configs.text_encoder else "",
                                     sdxl=configs.is_sdxl, refiner=configs.text_encoder is None)
    state = single_file.join_original(torch_state_dicts(params, dtype), version)
    with atomic.file(path) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})


def save_vae(path: str, config: AutoencoderConfig, params: Any, *, format: str = "sdjax") -> None:
    """Writes an autoencoder alone: an sdjax autoencoder export, or a diffusers ``AutoencoderKL`` folder."""
    check_format(format, VAE_FORMATS)
    if format == "sdjax":
        sdjax_format.save_vae(path, config, params)
    else:
        diffusers_folder.write_vae(path, config.to_diffusers_config(), flax_to_torch(jax.device_get(params)))
