"""Fine-tune a pretrained Stable Diffusion 1.x / 2.x model on your captioned images.

    sdjax-train latent --config sd15_finetune --workdir runs/ft --export runs/ft-export \
        --config.pretrained=stable-diffusion-v1-5 \
        --config.data.name=captioned_images --config.data.manual_dir=my_images
    sdjax-train latent --config sd15_finetune:tiny --workdir runs/ft-tiny --config.pretrained=TINY_SD_FOLDER  # CPU

``pretrained`` (a diffusers folder, an sdjax export, or an original single file with
``tokenizer.dir``) is read once and gives everything but the data: the architecture, the frozen
autoencoder and text encoder, the tokenizer, the noise schedule (prediction type) and the UNet
the training starts from. Any SD 1.x or 2.x checkpoint works, whatever its size.

Defaults as Stable Diffusion is usually fine-tuned: 512 px, AdamW at 1e-5 after 500 warm-up
steps, weight decay 1e-2, gradient clipping at 1, bf16 compute with f32 master weights, EMA
0.9999, caption dropout 0.1 (for classifier-free guidance). Memory: ``train.cache_latents=True``
takes the autoencoder out of the step, ``train.remat=True`` recomputes activations,
``mesh.shape=(-1, 8)`` shards parameters, EMA and Adam state over 8 devices (``fsdp``).

LoRA instead of the whole UNet (``--config.lora.rank=16``, ``lora.alpha``, ``lora.targets``,
``lora.dropout``): only the adapters train, with their own optimizer state and EMA; checkpoints
hold the adapters; the export is ``pytorch_lora_weights.safetensors`` for diffusers'
``load_lora_weights`` (``lora.layout=kohya`` for A1111/ComfyUI):

    sdjax-train latent --config sd15_finetune --workdir runs/lora --export runs/my-lora \
        --config.pretrained=stable-diffusion-v1-5 --config.lora.rank=16 --config.train.learning_rate=1e-4 \
        --config.data.name=captioned_images --config.data.manual_dir=my_images

The ``tiny`` variant is the same code path at CPU sizes (32 px, batch 4, f32), for a tiny test
checkpoint.
"""

import ml_collections

from sdjax import configs, sharding
from sdjax.data import config_section
from sdjax.training.schema import EvalConfig, LatentTrainConfig, LoraConfig, SampleConfig, TokenizerConfig


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    if variant not in (None, "tiny"):
        raise ValueError(f"sd15_finetune has the variant 'tiny', not {variant!r}.")
    c = ml_collections.ConfigDict()
    c.pretrained = ml_collections.FieldReference(None, field_type=str)
    c.unet_from_pretrained = True
    c.model = ml_collections.ConfigDict()  # overrides of the pretrained configs, e.g. model.scheduler
    c.tokenizer = configs.section(TokenizerConfig)
    c.data = config_section(name="captioned_images", image_size=512)
    c.train = configs.section(
        LatentTrainConfig, steps=10_000, batch_size=32, learning_rate=1e-5, warmup_steps=500, schedule="constant",
        weight_decay=1e-2, clip_norm=1.0, ema_decay=0.9999, dtype="bfloat16", caption_dropout=0.1,
        checkpoint_every=1000, max_to_keep=3, log_every=50, sample_every=1000)
    c.sample = configs.section(SampleConfig, num_steps=30, guidance_scale=7.5,
                               prompts=("a photo of a cat", "a painting of a lighthouse at sunset"))
    c.lora = configs.section(LoraConfig)  # lora.rank=N: train rank-N UNet adapters instead of the UNet
    c.eval = configs.section(EvalConfig)  # eval.every=N with eval.captions and judges: FID / CLIP score
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "fsdp")))
    c.logical_axis_rules = sharding.LOGICAL_AXIS_RULES
    if variant == "tiny":
        c.data.update(image_size=32, num_threads=2)
        c.train.update(steps=4, batch_size=4, warmup_steps=1, dtype="float32", checkpoint_every=2, log_every=1,
                       sample_every=2, fast_compile=True)
        c.sample.num_steps = 2
    return c
