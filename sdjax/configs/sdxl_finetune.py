"""Fine-tune a pretrained SDXL base model on your captioned images: the whole UNet, or LoRA adapters.

    sdjax-train latent --config sdxl_finetune --workdir runs/xl --export runs/xl-export \
        --config.pretrained=stable-diffusion-xl-base-1.0 \
        --config.data.name=captioned_images --config.data.manual_dir=my_images
    sdjax-train latent --config sdxl_finetune:tiny --workdir runs/xl-tiny --config.pretrained=TINY_SDXL_FOLDER  # CPU

``pretrained`` (an SDXL diffusers folder with ``tokenizer/`` and ``tokenizer_2/``, or an sdjax
export) gives the architecture, the frozen autoencoder, both frozen text encoders (CLIP ViT-L and
OpenCLIP ViT-bigG, penultimate layers, the second's pooled embedding), both tokenizers, the noise
schedule and the UNet the training starts from.

Micro-conditioning comes from the data, as SDXL was trained: each image's original (height,
width) and the crop's (top, left) from the pipeline's resize-and-crop, and the trained size. With
aspect-ratio buckets every bucket trains at its own size with its own compiled step:

    --config.data.buckets=1024x1024,896x1152,1152x896,832x1216,1216x832

Caption dropout zeros both text embeddings and the pooled one (what SDXL's pipelines read as the
negative conditioning of an empty negative prompt). Defaults: 1024 px, AdamW at 1e-5 after 500
warm-up steps, bf16 compute with f32 master weights, EMA 0.9999, ``train.remat`` on, parameters,
EMA and Adam state sharded over every device (``mesh.shape=(1, -1)``: fsdp; the batch still splits
over all of them). ``train.cache_latents=True`` encodes the images once and takes the autoencoder
out of the step; the cache keeps each image's crop for the micro-conditioning (one size: not with
buckets). ``train.cache_text=True`` beside it caches both encoders' penultimate states and the pooled
embedding too (f32, about 630 KB per caption at SDXL's 77 x 2048) and takes the text encoders out of
the step (not with ``lora.text_encoders``).

LoRA instead of the whole UNet (``--config.lora.rank=16``; the export is
``pytorch_lora_weights.safetensors`` for diffusers' ``StableDiffusionXLPipeline.load_lora_weights``,
``lora.layout=kohya`` for A1111/ComfyUI):

    sdjax-train latent --config sdxl_finetune --workdir runs/xl-lora --export runs/my-xl-lora \
        --config.pretrained=stable-diffusion-xl-base-1.0 --config.lora.rank=16 --config.train.learning_rate=1e-4 \
        --config.data.name=captioned_images --config.data.manual_dir=my_images

The ``tiny`` variant is the same code path at CPU sizes (32 px, batch 4, f32, no remat), for a
tiny test checkpoint.
"""

import ml_collections

from sdjax import configs, sharding
from sdjax.data import config_section
from sdjax.training.schema import EvalConfig, LatentTrainConfig, LoraConfig, SampleConfig, TokenizerConfig


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    if variant not in (None, "tiny"):
        raise ValueError(f"sdxl_finetune has the variant 'tiny', not {variant!r}.")
    c = ml_collections.ConfigDict()
    c.pretrained = ml_collections.FieldReference(None, field_type=str)
    c.unet_from_pretrained = True
    c.model = ml_collections.ConfigDict()  # overrides of the pretrained configs, e.g. model.scheduler
    c.tokenizer = configs.section(TokenizerConfig)
    c.data = config_section(name="captioned_images", image_size=1024)
    c.train = configs.section(
        LatentTrainConfig, steps=10_000, batch_size=32, learning_rate=1e-5, warmup_steps=500, schedule="constant",
        weight_decay=1e-2, clip_norm=1.0, ema_decay=0.9999, dtype="bfloat16", remat=True, caption_dropout=0.1,
        checkpoint_every=1000, max_to_keep=3, log_every=50, sample_every=1000)
    c.sample = configs.section(SampleConfig, num_steps=30, guidance_scale=5.0,
                               prompts=("a photo of a cat", "a painting of a lighthouse at sunset"))
    c.lora = configs.section(LoraConfig)  # lora.rank=N: train rank-N UNet adapters instead of the UNet
    c.eval = configs.section(EvalConfig)  # FID / CLIP score during training: SD 1/2 models only
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1), axes=("data", "fsdp")))
    c.logical_axis_rules = sharding.LOGICAL_AXIS_RULES
    if variant == "tiny":
        c.data.update(image_size=32, num_threads=2)
        c.train.update(steps=4, batch_size=4, warmup_steps=1, dtype="float32", remat=False, checkpoint_every=2,
                       log_every=1, sample_every=2, fast_compile=True)
        c.sample.num_steps = 2
    return c
