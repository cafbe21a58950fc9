"""Tiny latent diffusion on the synthetic captioned_shapes set: trains on a CPU in minutes.

    python train/latent.py --config configs/tiny.py --workdir /tmp/sdjax_tiny --export /tmp/sdjax_tiny_export
    python train/latent.py --config configs/tiny.py --workdir /tmp/sdjax_tiny --config.train.batch_size=32

32x32 images -> a 4x-downsampling VAE (8x8x4 latents) -> a two-level UNet with cross-attention
to a text encoder trained from scratch (no pretrained CLIP offline) on a word-level tokenizer
written into the workdir from ``tokenizer.words``. The text encoder has no transformer layers:
each word's context vector is its word and position embedding through the final LayerNorm, so a
shape word's vector never depends on the colour word before it (CLIP's causal self-attention would
tie them, and colour/shape pairs never seen in training would come out with a seen pair's shape;
the demo's measurements are in docs/demo.md).

Sections:
  model               diffusers-style dicts for ModelConfigs.from_dicts (unet, vae, text_encoder, scheduler).
  autoencoder.path    frozen VAE: an autoencoder export (train/autoencoder.py --export) or any SD checkpoint;
                      None = a random frozen VAE (seeded by autoencoder.seed), for smoke tests only.
  text_encoder        pretrained=PATH: frozen CLIP from a StableDiffusion checkpoint; None: trained from scratch.
  tokenizer           dir=a CLIP tokenizer folder, or a word-level one written into the workdir from
                      words=... or, with from_captions=True, from every word of the training captions.
  data                every sdjax.data.DataConfig field (batch_size is train.batch_size / number of hosts).
  train               optimisation, EMA, precision, logging, checkpointing and export settings;
                      cache_latents=True encodes the dataset once (into latent_cache_dir, default
                      <workdir>/latent_cache) and trains on the cached posteriors: no VAE in the step.
                      cache_text=True (with frozen text encoders) caches their outputs too: none in the step.
  sample              fixed prompts for the EMA sample grids (DDIM + classifier-free guidance).
  eval                FID and CLIP score every eval.every steps from eval.captions (docs/evaluation.md).
  mesh                device mesh: shape (-1 = fill with all devices) and axis names.
  logical_axis_rules  logical axis name -> mesh axes; first applicable rule wins, indivisible dims replicate.
"""

import ml_collections

from sdjax import configs, sharding
from sdjax.data import COLOR_NAMES, SHAPES, config_section
from sdjax.training.schema import (AutoencoderSource, EvalConfig, LatentTrainConfig, SampleConfig, TextEncoderSource,
                                   TokenizerConfig)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
            norm_num_groups=8, sample_size=32, scaling_factor=1.0),
        text_encoder=dict(
            vocab_size=1024, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=0,
            num_attention_heads=2, max_position_embeddings=16, hidden_act="gelu"),
        scheduler=dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                       prediction_type="epsilon"),
    )
    c.autoencoder = configs.section(AutoencoderSource)
    c.text_encoder = configs.section(TextEncoderSource)
    c.tokenizer = configs.section(TokenizerConfig, words=" ".join(("a", "on", "background") + SHAPES + COLOR_NAMES))
    c.data = config_section(name="captioned_shapes", image_size=32, num_examples=2000, num_threads=2)
    c.train = configs.section(
        LatentTrainConfig, steps=300, batch_size=32, learning_rate=1e-3, warmup_steps=20, schedule="cosine",
        weight_decay=0.0, ema_decay=0.999, min_snr_gamma=5.0, scale_by_std=True, checkpoint_every=100,
        max_to_keep=2, log_every=10, sample_every=100)
    c.sample = configs.section(
        SampleConfig, num_steps=20, guidance_scale=3.0,
        prompts=("a red circle on a green background", "a blue square on a yellow background",
                 "a green triangle on a red background", "a yellow circle on a blue background"))
    c.eval = configs.section(EvalConfig)  # eval.every=N with eval.captions and judges: FID / CLIP score
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "fsdp")))
    c.logical_axis_rules = sharding.LOGICAL_AXIS_RULES
    return c
