"""Stable Diffusion 2 base (512 px) trained from scratch, as MLPerf Training's Stable Diffusion benchmark.

    sdjax-train latent --config sd2_base --workdir runs/sd2 --export runs/sd2-export \
        --config.pretrained=stable-diffusion-2-base \
        --config.data.name=captioned_images --config.data.manual_dir=my_images
    sdjax-train latent --config sd2_base:tiny --workdir runs/sd2-tiny --config.pretrained=TINY_SD2_FOLDER  # CPU

MLPerf's preprocessed LAION latents (webdataset shards of ``KEY.npy`` moments + ``KEY.txt``), read in
place; ``sdjax-train encode`` writes the same layout from image shards, every host its share:

    sdjax-train encode --config sd2_base --out gs://BUCKET/latents --config.pretrained=stable-diffusion-2-base \
        --config.data.name=webdataset --config.data.files='gs://BUCKET/laion/{00000..00831}.tar'
    sdjax-train latent --config sd2_base --workdir gs://BUCKET/runs/sd2 --config.pretrained=stable-diffusion-2-base \
        --config.data.name=webdataset --config.data.moments_ext=npy \
        --config.data.files='/datasets/laion-400m/webdataset-moments-filtered/{00000..00831}.tar'

MLPerf's evaluation, every 1,000 steps (512,000 images), the run ending at FID <= 90 and CLIP score
>= 0.15, is on once the COCO captions and the judges are given (``docs/evaluation.md``):

    sdjax-train latent --config sd2_base --workdir gs://BUCKET/runs/sd2 ... \
        --config.eval.captions=/datasets/coco2014/val2014_30k.tsv \
        --config.eval.ref_stats=/datasets/coco2014/val2014_30k_stats.npz \
        --config.eval.inception=pt_inception-2015-12-05-6726825d.pth \
        --config.eval.clip=open_clip_pytorch_model.bin --config.eval.clip_tokenizer=bpe_simple_vocab_16e6.txt.gz \
        --config.eval.allow_pickle=True

``pretrained`` (an SD 2.x checkpoint: a diffusers folder, an sdjax export, or a single file with
``tokenizer.dir``) gives the frozen OpenCLIP ViT-H text encoder (penultimate layer) and the frozen
kl-f8 autoencoder and the tokenizer; the UNet starts from a random initialisation with SD 2's
shapes. Hyper-parameters from the MLPerf reference, mlcommons/training
``stable_diffusion/configs/train_512_latents.yaml``: v-prediction, linear-in-transformer UNet
with 64-wide heads attending to 1024-wide text, AdamW at 1.25e-7 per image of the global batch
(LDM's ``scale_lr``: 512 images -> 6.4e-5) after 10,000 linear warm-up steps (from 1e-6 of it),
weight decay 1e-2 (torch's AdamW default), no gradient clipping, no EMA, 16-bit compute (bf16
here), latent scale 0.18215, trained from precomputed latents (``train.cache_latents``; MLPerf
encodes its LAION subset beforehand), no caption dropout.

The ``tiny`` variant is the same code path at CPU sizes (a small SD 2-style UNet, 32 px, batch 4),
for a tiny SD 2 test checkpoint.
"""

import ml_collections

from sdjax import configs, presets, sharding
from sdjax.data import config_section
from sdjax.training.schema import EvalConfig, LatentTrainConfig, SampleConfig, TokenizerConfig

GLOBAL_BATCH = 512
EVAL_EVERY_IMAGES = 512_000
BASE_LEARNING_RATE = 1.25e-7  # per image of the global batch


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    if variant not in (None, "tiny"):
        raise ValueError(f"sd2_base has the variant 'tiny', not {variant!r}.")
    c = ml_collections.ConfigDict()
    c.pretrained = ml_collections.FieldReference(None, field_type=str)
    c.unet_from_pretrained = False
    unet = presets.sd21()["unet"]
    unet.update(sample_size=64, attention_head_dim=(5, 10, 20, 20), upcast_attention=False)  # 64-wide heads, 512 px
    c.model = ml_collections.ConfigDict(dict(unet=unet, scheduler=dict(prediction_type="v_prediction")))
    c.tokenizer = configs.section(TokenizerConfig)
    c.data = config_section(name="captioned_images", image_size=512)
    c.train = configs.section(
        LatentTrainConfig, steps=1_000_000, batch_size=GLOBAL_BATCH, learning_rate=BASE_LEARNING_RATE * GLOBAL_BATCH,
        warmup_steps=10_000, schedule="constant", weight_decay=1e-2, clip_norm=0.0, ema_decay=0.0,
        dtype="bfloat16", caption_dropout=0.0, latent_scale=0.18215, scale_by_std=False, cache_latents=True,
        checkpoint_every=2000, max_to_keep=3, log_every=50, sample_every=0)
    c.sample = configs.section(SampleConfig, num_steps=50, guidance_scale=8.0, prompts=("a photo of a cat",))
    # MLPerf's evaluation: every 512,000 images, FID and CLIP score of 30,000 COCO captions' images, the
    # run done at FID <= 90 and CLIP >= 0.15 (on once eval.captions and the judges are set; see above).
    c.eval = configs.section(EvalConfig, every=EVAL_EVERY_IMAGES // GLOBAL_BATCH, target_fid=90.0, target_clip=0.15)
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "fsdp")))
    c.logical_axis_rules = sharding.LOGICAL_AXIS_RULES
    if variant == "tiny":
        c.model.unet = dict(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4, 4), norm_num_groups=16, use_linear_projection=True)
        c.data.update(image_size=32, num_threads=2)
        c.train.update(steps=4, batch_size=4, learning_rate=1e-3, warmup_steps=1, dtype="float32",
                       checkpoint_every=2, log_every=1, fast_compile=True)
    return c
