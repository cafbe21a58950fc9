"""Tiny perceptual KL autoencoder on the synthetic captioned_shapes set: trains on a CPU in minutes.

    python train/autoencoder.py --config configs/tiny_autoencoder.py --workdir /tmp/sdjax_vae \
        --export /tmp/sdjax_vae_export
    python train/latent.py --config configs/tiny.py --workdir /tmp/sdjax_tiny \
        --config.autoencoder.path=/tmp/sdjax_vae_export

32x32 images -> 8x8x4 latents (downsample factor 4). Without LPIPS weights (none can be
downloaded offline) the perceptual term is off; pass --config.loss.lpips_path=FILE (written by
``python -m sdjax.tools.convert_lpips``) to switch it on.

Sections:
  model               diffusers AutoencoderKL config fields.
  discriminator       NLayerDiscriminator: ndf (first width), n_layers (stride-2 convs).
  loss                LPIPSWithDiscriminator: disc_start, kl_weight, disc_weight, disc_factor,
                      perceptual_weight, logvar_init, lpips_path.
  data                sdjax.data.DataConfig fields (batch_size is train.batch_size / number of hosts).
  train               optimisation (Adam b1=0.5, b2=0.9), logging, held-out evaluation, checkpoints, export.
  mesh                device mesh: shape (-1 = fill with all devices) and axis names.
  logical_axis_rules  logical axis name -> mesh axes; first applicable rule wins, indivisible dims replicate.
"""

import ml_collections

from sdjax import configs, sharding
from sdjax.data import config_section
from sdjax.training.schema import AutoencoderTrainConfig, DiscriminatorConfig, LossConfig


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        norm_num_groups=8, sample_size=32, scaling_factor=1.0))
    c.discriminator = configs.section(DiscriminatorConfig, ndf=32, n_layers=2)
    c.loss = configs.section(LossConfig, disc_start=1500)
    c.data = config_section(name="captioned_shapes", image_size=32, num_examples=2000, num_threads=2)
    c.train = configs.section(AutoencoderTrainConfig, steps=2000, batch_size=16, learning_rate=1e-3,
                              checkpoint_every=500, max_to_keep=2, log_every=50, eval_every=250, eval_images=64)
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "fsdp")))
    c.logical_axis_rules = sharding.LOGICAL_AXIS_RULES
    return c
