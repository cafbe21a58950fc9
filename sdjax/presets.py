"""Published Stable Diffusion architectures, as the config.json files of their diffusers releases.

Configs in ``configs/`` start from these; checkpoint folders override them with their own files.
"""

import copy

_SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
    clip_sample=False,
)

_KL_F8 = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False,
)

_CLIP_L14 = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


def sd15() -> dict:
    """Stable Diffusion 1.x (1.4, 1.5): CLIP ViT-L/14 text encoder, epsilon prediction, 512x512."""
    return copy.deepcopy(dict(unet=_SD15_UNET, vae=_KL_F8, text_encoder=_CLIP_L14, scheduler=_SD_SCHEDULER))


def sd21() -> dict:
    """Stable Diffusion 2.x (2.0-v, 2.1): OpenCLIP ViT-H text encoder (23 of 24 layers), v-prediction, 768x768."""
    cfg = sd15()
    cfg["unet"].update(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                       use_linear_projection=True, upcast_attention=True)
    cfg["text_encoder"].update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                               num_attention_heads=16, hidden_act="gelu")
    cfg["scheduler"].update(prediction_type="v_prediction")
    return cfg


_CLIP_BIG_G = dict(  # OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's text_encoder_2)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
    architectures=["CLIPTextModelWithProjection"],
)


def sdxl() -> dict:
    """SDXL 1.0 base: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (both read at their penultimate layer, bigG's
    pooled projection and six micro-conditioning numbers added to the timestep embedding), 1024x1024."""
    cfg = sd15()
    cfg["unet"].update(sample_size=128, block_out_channels=(320, 640, 1280),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                       transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    cfg["vae"].update(scaling_factor=0.13025)
    cfg.update(text_encoder_2=copy.deepcopy(_CLIP_BIG_G), force_zeros_for_empty_prompt=True)
    return cfg


def sdxl_refiner() -> dict:
    """SDXL 1.0 refiner: OpenCLIP ViT-bigG/14 alone, five micro-conditioning numbers (an aesthetic score
    in place of the target size), 1024x1024."""
    cfg = sdxl()
    del cfg["text_encoder"]
    cfg["unet"].update(block_out_channels=(384, 768, 1536, 1536),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280, transformer_layers_per_block=4,
                       projection_class_embeddings_input_dim=2560)
    cfg.update(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True)
    return cfg


PRESETS = {"sd15": sd15, "sd21": sd21, "sdxl": sdxl, "sdxl_refiner": sdxl_refiner}


def get(name: str) -> dict:
    """A published architecture's config dicts by name (a fresh copy each call)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]()
