"""Reading a diffusers pipeline folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/)."""

import glob
import json
import os
import re
import shutil
from typing import Any

import numpy as np

from sdjax.checkpoints import atomic
from sdjax.checkpoints.errors import CheckpointError
from sdjax.checkpoints.tensors import read_tensors

MODEL_INDEX = "model_index.json"
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def is_diffusers_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_INDEX))


def networks(model_index: dict[str, Any]) -> tuple[str, ...]:
    """The networks sdjax reads from a pipeline folder with this model_index.json (SDXL: a second text
    encoder; SDXL's refiner: that one alone, its ``text_encoder`` entry null)."""
    present = [name for name in ("text_encoder", "text_encoder_2") if (model_index.get(name) or [None])[0]]
    return ("unet", "vae", *present)


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing; the checkpoint folder is incomplete.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}).") from e


def _weight_files(folder: str, variant: str | None, allow_pickle: bool) -> list[str]:
    suffixes = [".safetensors"] + ([".bin"] if allow_pickle else [])
    infix = f".{variant}" if variant else ""
    for suffix in suffixes:
        for stem in _WEIGHT_STEMS:
            single = os.path.join(folder, f"{stem}{infix}{suffix}")
            if os.path.isfile(single):
                return [single]
            index = single + ".index.json"
            if os.path.isfile(index):
                shards = sorted(set(read_json(index)["weight_map"].values()))
                return [os.path.join(folder, s) for s in shards]
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")))
    pickles = [f for f in found if f.endswith(".bin")]
    hint = (" The folder holds PyTorch pickles only: pass allow_pickle=True (loads them with "
            "torch.load(weights_only=True)) or convert them to safetensors." if pickles and not allow_pickle else "")
    variants = sorted({m.group(1) for f in found
                       if (m := re.fullmatch(rf"(?:{'|'.join(_WEIGHT_STEMS)})\.([^.]+)\."
                                             r"(?:safetensors|bin)(?:\.index\.json)?", f))})
    if variants and variant not in variants:
        hint += (f" The folder holds the {' and '.join(map(repr, variants))} variant: pass variant={variants[0]!r} "
                 f"(--variant {variants[0]} on the command line).")
    raise CheckpointError(f"{folder}: no weights file found (looked for "
                          f"{'/'.join(_WEIGHT_STEMS)}{infix}{'|'.join(suffixes)}; found {found}).{hint}")


def read_component(path: str, name: str, *, variant: str | None = None,
                   allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config.json and the state dict (torch names, numpy values) of one component."""
    folder = os.path.join(path, name)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path}: no {name}/ folder; a Stable Diffusion diffusers folder needs "
                              "unet/, vae/, text_encoder/, tokenizer/ and scheduler/.")
    config = read_json(os.path.join(folder, "config.json"))
    state: dict[str, np.ndarray] = {}
    for f in _weight_files(folder, variant, allow_pickle):
        state.update(read_tensors(f, allow_pickle=allow_pickle))
    return config, state


def read_scheduler_config(path: str) -> dict[str, Any] | None:
    f = os.path.join(path, "scheduler", "scheduler_config.json")
    return read_json(f) if os.path.isfile(f) else None


# ---- writing (the diffusers export) ---------------------------------------------------------------------

# The pipeline class diffusers builds for a UNet with this many input channels (SD 1/2, SDXL).
PIPELINE_CLASSES = {4: "StableDiffusionPipeline", 9: "StableDiffusionInpaintPipeline"}
SDXL_PIPELINE_CLASSES = {4: "StableDiffusionXLPipeline", 9: "StableDiffusionXLInpaintPipeline"}
SCHEDULER_CLASS = "DDIMScheduler"  # sdjax keeps the schedule, not the sampler; every sampler reads it
# Written into every config: diffusers gates its fixes for old (pre-0.9) folders on it and some pipelines
# require it. The files are laid out as this diffusers version writes them.
DIFFUSERS_VERSION = "0.39.0"


def _write_json(path: str, d: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)


def _write_component(folder: str, config: dict[str, Any], state: dict[str, np.ndarray], stem: str) -> None:
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), {**config, "_diffusers_version": DIFFUSERS_VERSION})
    save_file(state, os.path.join(folder, f"{stem}.safetensors"), metadata={"format": "pt"})


def is_vae_folder(path: str) -> bool:
    """A diffusers ``AutoencoderKL`` folder (what ``AutoencoderKL.from_pretrained`` reads)."""
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        return False
    return read_json(f).get("_class_name") == "AutoencoderKL"


def write_vae(path: str, config: dict[str, Any], state: dict[str, np.ndarray]) -> None:
    """Writes a diffusers ``AutoencoderKL`` folder (config.json + diffusion_pytorch_model.safetensors)."""
    with atomic.folder(path, is_vae_folder, "a diffusers AutoencoderKL folder") as tmp:
        _write_component(tmp, config, state, "diffusion_pytorch_model")


def write_pipeline(path: str, configs: dict[str, dict[str, Any]], states: dict[str, dict[str, np.ndarray]],
                   tokenizers: dict[str, tuple[Any, str]]) -> None:
    """Writes a diffusers pipeline folder that ``StableDiffusionPipeline.from_pretrained`` (the inpainting
    pipeline for a 9-channel UNet; SDXL's with ``text_encoder_2``) loads. ``configs``: diffusers/transformers
    config dicts of ``unet``, ``vae``, ``text_encoder`` (, ``text_encoder_2``), ``scheduler``; ``states``:
    PyTorch-layout state dicts; ``tokenizers``: {"tokenizer" (, "tokenizer_2"): (tokenizer, its folder)},
    each saved by transformers plus its source files (vocab.json, merges.txt), which older transformers'
    slow ``CLIPTokenizer`` needs."""
    sdxl = "text_encoder_2" in configs
    pipeline = (SDXL_PIPELINE_CLASSES if sdxl else PIPELINE_CLASSES).get(configs["unet"]["in_channels"],
                                                                         PIPELINE_CLASSES[4])
    if configs.get("requires_aesthetics_score"):
        pipeline = "StableDiffusionXLImg2ImgPipeline"  # the refiner's
    texts = tuple(name for name in ("text_encoder", "text_encoder_2") if name in configs)
    with atomic.folder(path, is_diffusers_dir, "a diffusers folder (model_index.json)") as tmp:
        _write_component(os.path.join(tmp, "unet"), configs["unet"], states["unet"], "diffusion_pytorch_model")
        _write_component(os.path.join(tmp, "vae"), configs["vae"], states["vae"], "diffusion_pytorch_model")
        for name in texts:
            _write_component(os.path.join(tmp, name), configs[name], states[name], "model")
        for name, (tokenizer, tokenizer_dir) in tokenizers.items():
            tokenizer.save_pretrained(os.path.join(tmp, name))
            for file in ("vocab.json", "merges.txt"):
                source, dest = os.path.join(tokenizer_dir, file), os.path.join(tmp, name, file)
                if os.path.isfile(source) and not os.path.exists(dest):
                    shutil.copyfile(source, dest)
        os.makedirs(os.path.join(tmp, "scheduler"))
        _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"),
                    {"_class_name": SCHEDULER_CLASS, "_diffusers_version": DIFFUSERS_VERSION, **configs["scheduler"]})
        index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", SCHEDULER_CLASS]}
        for name in texts:
            index[name] = ["transformers", configs[name]["architectures"][0]]
            index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
        if sdxl:
            for name in ("text_encoder", "tokenizer"):
                index.setdefault(name, [None, None])
            index.update(image_encoder=[None, None], feature_extractor=[None, None],
                         force_zeros_for_empty_prompt=configs["force_zeros_for_empty_prompt"])
            if configs["requires_aesthetics_score"]:  # a config key of the img2img pipeline alone
                index["requires_aesthetics_score"] = True
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        _write_json(os.path.join(tmp, MODEL_INDEX), index)
