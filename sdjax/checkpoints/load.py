"""Loading any checkpoint sdjax reads: format detection, reading, conversion to sdjax parameters.

``load(path)`` -> ``Loaded(configs, params, tokenizer_dir)`` for a diffusers folder, an
original single file or an sdjax export; ``load_vae(path)`` takes the autoencoder out of an
autoencoder export, a diffusers ``AutoencoderKL`` folder or any of those; ``load_lpips(path)``
reads the LPIPS weights file.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.checkpoints import diffusers_folder, hub, sdjax_format, single_file
from sdjax.checkpoints.convert import text_encoder_from_torch, torch_to_flax
from sdjax.checkpoints.errors import CheckpointError
from sdjax.checkpoints.tensors import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, read_safetensors, read_tensors
from sdjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from sdjax.models.configs import ModelConfigs, abstract_module_params, abstract_params, vae_inputs
from sdjax.models.inception import FIDInceptionV3
from sdjax.models.layers import unbox
from sdjax.models.lpips import LPIPS

SUPPORTED_FORMATS = (
    "a diffusers folder (model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/), "
    "a single-file SD 1.x/2.x checkpoint (.safetensors; .ckpt with allow_pickle=True), "
    "or an sdjax export (sdjax.json + params/, written by save_pretrained)"
)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A checkpoint read into sdjax's terms."""
    configs: ModelConfigs
    params: dict[str, Any]  # {"unet", "vae", "text_encoder"}, and SDXL's "text_encoder_2"
    tokenizer_dir: str | None  # the folder holding the checkpoint's tokenizer files, if it has one
    tokenizer_2_dir: str | None = None  # SDXL's second tokenizer (OpenCLIP's: pads with "!")


def detect_format(path: str) -> str:
    """"sdjax", "diffusers" or "single_file"; raises with the supported formats otherwise."""
    path = hub.resolve(path, "checkpoint")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory. Expected {SUPPORTED_FORMATS}.")
    if os.path.isdir(path) and sdjax_format.is_sdjax_dir(path):
        return "sdjax"
    if os.path.isdir(path) and diffusers_folder.is_diffusers_dir(path):
        return "diffusers"
    if os.path.isfile(path) and path.endswith((SAFETENSORS_SUFFIX,) + PICKLE_SUFFIXES):
        return "single_file"
    raise CheckpointError(f"{path}: not a checkpoint sdjax can read. Supported: {SUPPORTED_FORMATS}.")


def params_from_state_dicts(configs: ModelConfigs, states: dict[str, dict[str, np.ndarray]],
                            param_dtype: Any = jnp.float32, source: str = "") -> dict[str, Any]:
    """Convert torch-named state dicts (``configs.networks``) to sdjax params."""
    target = abstract_params(configs, param_dtype)
    trees = {name: torch_to_flax(states[name], target[name], what=f"{source} {name}".strip())
             for name in ("unet", "vae")}
    trees.update({name: text_encoder_from_torch(states[name], getattr(configs, name))
                  for name in configs.text_encoder_names})
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float32), param_dtype), trees)


def load(path: str, *, param_dtype: Any = jnp.float32, prediction_type: str | None = None,
         allow_pickle: bool = False, variant: str | None = None, revision: str | None = None,
         single_file_options: dict[str, Any] | None = None) -> Loaded:
    """Reads a diffusers folder, a single-file SD checkpoint, or an sdjax export (see
    ``StableDiffusion.from_pretrained`` for the options)."""
    path = hub.resolve(path, "checkpoint", revision=revision, variant=variant, allow_pickle=allow_pickle)
    fmt = detect_format(path)
    tokenizer_dir = os.path.join(path, "tokenizer")
    if fmt == "sdjax":
        configs = ModelConfigs.from_dicts(sdjax_format.read_configs(path))
        params = sdjax_format.load_params(path, abstract_params(configs, param_dtype))
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, param_dtype), params)
    elif fmt == "diffusers":
        states, raw = {}, {}
        index = diffusers_folder.read_json(os.path.join(path, diffusers_folder.MODEL_INDEX))
        for name in diffusers_folder.networks(index):
            raw[name], states[name] = diffusers_folder.read_component(
                path, name, variant=variant, allow_pickle=allow_pickle)
        raw["scheduler"] = diffusers_folder.read_scheduler_config(path) or {}
        for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
            raw[key] = index.get(key, False)
        configs = ModelConfigs.from_dicts(raw)
        params = params_from_state_dicts(configs, states, param_dtype, source=path)
    else:
        state = read_tensors(path, allow_pickle=allow_pickle)
        parts = single_file.split_original(state)
        configs = ModelConfigs.from_dicts(single_file.infer_configs(state, parts=parts, **(single_file_options or {})))
        params = params_from_state_dicts(configs, parts, param_dtype, source=path)
        tokenizer_dir = None
    if prediction_type is not None:
        configs = dataclasses.replace(
            configs, scheduler=dataclasses.replace(configs.scheduler, prediction_type=prediction_type))
    tokenizer_dirs = [d if d is not None and os.path.isdir(d) else None
                      for d in (tokenizer_dir, tokenizer_dir and os.path.join(path, "tokenizer_2"))]
    return Loaded(configs, params, *tokenizer_dirs)


def load_vae(path: str) -> tuple[AutoencoderConfig, Any]:
    """(config, params) of the autoencoder in ``path``: an autoencoder export (phase 1's) or any
    whole Stable Diffusion checkpoint ``load`` reads."""
    path = hub.resolve(path, "autoencoder", kind="autoencoder")
    if os.path.isdir(path) and sdjax_format.is_vae_dir(path):
        return sdjax_format.read_vae(path)
    if os.path.isdir(path) and diffusers_folder.is_vae_folder(path):
        return _read_diffusers_vae(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory. Give an autoencoder export "
                                f"({sdjax_format.VAE_MARKER} + params/), a diffusers AutoencoderKL folder or a "
                                "Stable Diffusion checkpoint.")
    loaded = load(path)
    return loaded.configs.vae, loaded.params["vae"]


def _read_diffusers_vae(path: str) -> tuple[AutoencoderConfig, Any]:
    raw, state = diffusers_folder.read_component(os.path.dirname(path), os.path.basename(path))
    config = AutoencoderConfig.from_diffusers_config(raw)
    target = abstract_module_params(AutoencoderKL(config), vae_inputs(config))
    params = torch_to_flax(state, target, what=f"{path} (diffusers AutoencoderKL)")
    return config, jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params)


def load_lpips(path: str, param_dtype: Any = jnp.float32) -> dict:
    """The ``params`` tree of ``sdjax.models.lpips.LPIPS`` from its weights file (layout in that module).

    Raises CheckpointError naming missing, unexpected or mis-shaped tensors.
    """
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    target = jax.eval_shape(LPIPS(param_dtype=param_dtype).init, jax.random.key(0), x, x)
    params = torch_to_flax(read_safetensors(path), unbox(target)["params"], what=f"LPIPS weights {path}")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, param_dtype), params)


def load_inception(path: str, allow_pickle: bool = False) -> dict:
    """The ``params`` tree of ``sdjax.models.inception.FIDInceptionV3`` from pytorch-fid's weights
    (``pt_inception-2015-12-05-6726825d.pth``, a PyTorch pickle read only with ``allow_pickle``) or a
    .safetensors file with the same tensors. Its classifier (``fc``) is not used.

    Raises CheckpointError naming missing, unexpected or mis-shaped tensors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such Inception weights file. FID uses pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth (its GitHub release 'fid_weights').")
    x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    target = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)["params"]
    state = read_tensors(path, allow_pickle=allow_pickle)
    params = torch_to_flax(state, target, what=f"Inception weights {path}",
                           ignore=("num_batches_tracked", "fc.weight", "fc.bias"))
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
