"""Stable Diffusion's kl-f8 autoencoder (8x downsampling, 4 latent channels), trained as the originals.

    sdjax-train autoencoder --config kl_f8 --workdir runs/kl-f8 --export runs/kl-f8-export \
        --config.loss.lpips_path=lpips.safetensors \
        --config.data.name=captioned_images --config.data.manual_dir=my_images
    sdjax-train autoencoder --config kl_f8:tiny --workdir runs/kl-f8-tiny   # CPU, on captioned_shapes

CompVis' ``autoencoder_kl_32x32x4.yaml`` (latent-diffusion): the kl-f8 network (channels
128/256/512/512, two ResNet blocks per level, no attention but the middle block's), trained on
256 px random crops with L1 + LPIPS (``loss.lpips_path``: write it once with ``python -m
sdjax.tools.convert_lpips``) + KL at weight 1e-6, and the PatchGAN discriminator (3 layers, 64
wide) switched on at step 50,001 with the adaptive weight scaled by 0.5; both networks use
Adam(b1=0.5, b2=0.9) at 4.5e-6 per image of the global batch (``scale_lr``: 96 images ->
4.32e-4). The exported ``scaling_factor`` is measured (1 / std of the latents).

The ``tiny`` variant is the same code path at CPU sizes (the same four levels at widths 8-16,
32 px, a 1-layer discriminator switched on at step 3).
"""

import ml_collections

from sdjax import configs, presets, sharding
from sdjax.data import config_section
from sdjax.training.schema import AutoencoderTrainConfig, DiscriminatorConfig, LossConfig

GLOBAL_BATCH = 96
BASE_LEARNING_RATE = 4.5e-6  # per image of the global batch


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    if variant not in (None, "tiny"):
        raise ValueError(f"kl_f8 has the variant 'tiny', not {variant!r}.")
    c = ml_collections.ConfigDict()
    model = presets.sd15()["vae"]
    model.update(sample_size=256, scaling_factor=1.0)
    c.model = ml_collections.ConfigDict(model)
    c.discriminator = configs.section(DiscriminatorConfig, ndf=64, n_layers=3)
    c.loss = configs.section(LossConfig, disc_start=50_001, kl_weight=1e-6, disc_weight=0.5, perceptual_weight=1.0)
    c.data = config_section(name="captioned_images", image_size=256, random_crop=True, random_flip=True)
    c.train = configs.section(AutoencoderTrainConfig, steps=250_000, batch_size=GLOBAL_BATCH,
                              learning_rate=BASE_LEARNING_RATE * GLOBAL_BATCH, checkpoint_every=5000, max_to_keep=3,
                              log_every=50, eval_every=2500, eval_images=64)
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "fsdp")))
    c.logical_axis_rules = sharding.LOGICAL_AXIS_RULES
    if variant == "tiny":
        c.model.update(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, sample_size=32)
        c.discriminator.update(ndf=8, n_layers=1)
        c.loss.disc_start = 3
        c.data.update(name="captioned_shapes", image_size=32, num_examples=64, num_threads=2)
        c.train.update(steps=4, batch_size=4, learning_rate=BASE_LEARNING_RATE * 4, checkpoint_every=2, log_every=1,
                       eval_every=2, eval_images=4, fast_compile=True)
    return c
