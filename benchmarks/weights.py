"""Random-weight Stable Diffusion folders in diffusers format, created once and reused.

``sd15``: SD 1.5 shapes (860M UNet, 84M VAE, 123M CLIP-L text encoder), about 4.3 GB in f32.
``tiny``: a few-MB model with the same block types, for smoke tests and the scaling check.
The tokenizer is a small CLIP-format vocabulary (the text encoder keeps CLIP's 49408 rows).
"""

import json
import os
import shutil
from pathlib import Path

from sdjax import presets
from sdjax.training.word_tokenizer import write_word_tokenizer

WORDS = "a photo of an astronaut riding horse on the moon cat dog painting red blue".split()
SIZES = ("tiny", "sd15")

TINY = dict(
    unet=dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             norm_num_groups=8, sample_size=32),
    text_encoder=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
)


def configs(size: str) -> dict:
    if size == "tiny":
        return json.loads(json.dumps(TINY))
    if size == "sd15":
        cfg = presets.sd15()
        cfg["unet"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg["unet"].items()}
        cfg["vae"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg["vae"].items()}
        return cfg
    raise ValueError(f"size must be one of {SIZES}, got {size!r}.")


def bytes_needed(size: str) -> int:
    return 5 * 2**30 if size == "sd15" else 50 * 2**20


def ensure_folder(size: str, cache_dir: str | Path, seed: int = 0) -> Path:
    """The diffusers folder for ``size`` under ``cache_dir``, created on first use (atomically)."""
    folder = Path(cache_dir) / f"{size}-random"
    if (folder / "model_index.json").is_file():
        return folder
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
    if free < 1.5 * bytes_needed(size):
        raise OSError(f"{cache_dir} has {free / 2**30:.1f} GiB free; the {size} weights need about "
                      f"{bytes_needed(size) / 2**30:.1f} GiB. Pass --cache-dir on a larger disk.")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _save(size, tmp, seed)
    os.replace(tmp, folder)
    return folder


def _save(size: str, folder: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = configs(size)
    torch.manual_seed(seed)
    with torch.no_grad():
        unet = UNet2DConditionModel(**cfg["unet"]).eval()
        vae = AutoencoderKL(**{k: v for k, v in cfg["vae"].items()}).eval()
        text = cfg["text_encoder"]
        text_encoder = CLIPTextModel(CLIPTextConfig(**text, bos_token_id=49406 if size == "sd15" else 0,
                                                    eos_token_id=49407 if size == "sd15" else 2)).eval()
    tok_dir = write_word_tokenizer(folder.parent / f"{folder.name}-tokenizer", WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.rmtree(tok_dir)
    # The Flax peer's transformers 4.x reads vocab.json + merges.txt (transformers 5 saves only tokenizer.json)
    # and text-encoder keys with the ``text_model.`` prefix, as the published SD 1.5 files have them.
    write_word_tokenizer(folder / "tokenizer", WORDS)
    prefix_text_encoder(folder / "text_encoder" / "model.safetensors")


def prefix_text_encoder(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    if not all(k.startswith("text_model.") for k in state):
        save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}, str(path),
                  metadata={"format": "pt"})
