"""Tiny random PyTorch reference models (diffusers + transformers) saved in the real formats.

Two styles: "sd1" (conv projections, one head count for all levels, quick_gelu text encoder,
epsilon) and "sd2" (linear projections, per-level heads, gelu text encoder, v-prediction).
GroupNorm and LayerNorm weights are randomised so a wrong parameter mapping cannot pass.
"""

from pathlib import Path

import torch

from tests.helpers import write_tokenizer

STYLES = {
    "sd1": dict(
        unet=dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 norm_num_groups=8, sample_size=32),
        text_encoder=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=0, eos_token_id=2, pad_token_id=1),
        prediction_type="epsilon",
        single_file=dict(version="v1", options=dict(norm_num_groups=8, text_heads=4)),
    ),
    "sd2": dict(
        unet=dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=(2, 4, 4), cross_attention_dim=48, norm_num_groups=16,
                  use_linear_projection=True, upcast_attention=True),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 norm_num_groups=16, sample_size=32),
        text_encoder=dict(vocab_size=1000, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                          bos_token_id=0, eos_token_id=2, pad_token_id=1),
        prediction_type="v_prediction",
        single_file=dict(version="v2", options=dict(norm_num_groups=16, unet_heads=(2, 4, 4), text_heads=4)),
    ),
}


def randomize_norms(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def build_torch_models(style: str, seed: int = 0, inpainting: bool = False):
    """(unet, vae, text_encoder): tiny random torch models in eval mode, float32; ``inpainting``: a
    9-channel UNet (noisy latents, mask, masked-image latents) as in SD inpainting checkpoints."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = STYLES[style]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(cfg["unet"], in_channels=9 if inpainting else 4))
    vae = AutoencoderKL(**cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    for i, m in enumerate((unet, vae, text_encoder)):
        randomize_norms(m, seed + 100 + i)
        m.eval()
    return unet, vae, text_encoder


def save_pipeline(folder: Path, style: str, seed: int = 0, inpainting: bool = False) -> Path:
    """A tiny StableDiffusionPipeline (``inpainting``: StableDiffusionInpaintPipeline) saved as a
    diffusers folder (safetensors weights)."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, vae, text_encoder = build_torch_models(style, seed, inpainting)
    tok_dir = write_tokenizer(Path(folder).parent / f"{Path(folder).name}-tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    tokenizer.model_max_length = 77
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=STYLES[style]["prediction_type"])
    pipeline = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


SDXL = dict(  # SDXL's layout at toy widths: no attention at the top level, uneven depth, two text encoders
    unet=dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), cross_attention_dim=32 + 24,
              norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
    vae=dict(STYLES["sd1"]["vae"], scaling_factor=0.13025, force_upcast=True),
    text_encoder=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                      bos_token_id=0, eos_token_id=2, pad_token_id=1),
    text_encoder_2=dict(vocab_size=1000, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=16,
                        bos_token_id=0, eos_token_id=2, pad_token_id=1),
)


def save_sdxl_pipeline(folder: Path, seed: int = 0, refiner: bool = False, inpainting: bool = False) -> Path:
    """A tiny StableDiffusionXLPipeline (Euler "leading", zero negative conditioning for an absent
    negative prompt, the second tokenizer padding with "!") saved as a diffusers folder; ``refiner``:
    the refiner's StableDiffusionXLImg2ImgPipeline instead (the second text encoder alone, an aesthetic
    score in the micro-conditioning, the empty prompt's negative conditioning); ``inpainting``: a
    StableDiffusionXLInpaintPipeline with a 9-channel UNet (mask and masked-image latents)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    text_2 = SDXL["text_encoder_2"]
    unet_config = SDXL["unet"] if not refiner else dict(
        SDXL["unet"], cross_attention_dim=text_2["hidden_size"],
        projection_class_embeddings_input_dim=text_2["projection_dim"] + 5 * SDXL["unet"]["addition_time_embed_dim"])
    if inpainting:
        unet_config = dict(unet_config, in_channels=9)
    unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**SDXL["vae"])
    text_encoder = None if refiner else CLIPTextModel(CLIPTextConfig(**SDXL["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2))
    for i, m in enumerate((unet, vae, text_encoder, text_encoder_2)):
        if m is not None:
            randomize_norms(m, seed + 100 + i)
            m.eval()
    tokenizers = []
    for name, config in (("tokenizer", None), ("tokenizer_2", {"pad_token": "!"})):
        tokenizer = CLIPTokenizer.from_pretrained(
            str(write_tokenizer(Path(folder).parent / f"{Path(folder).name}-{name}", config)))
        tokenizer.model_max_length = 77
        tokenizers.append(tokenizer)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    parts = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers[0],
                 tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler, add_watermarker=False)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**dict(parts, tokenizer=None), requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=False)
    elif inpainting:
        pipe = StableDiffusionXLInpaintPipeline(**parts, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
