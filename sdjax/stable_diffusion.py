"""``StableDiffusion``: the three networks, their parameters, the tokenizer and the noise schedule."""

import copy
import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import generate, images as images_lib, lora, options as options_lib, sources
from sdjax.checkpoints import export, load as load_lib, lora as lora_files
from sdjax.models.autoencoder import AutoencoderKL
from sdjax.models.configs import ModelConfigs
from sdjax.tokenizer import load_tokenizer, tokenize


@dataclasses.dataclass
class StableDiffusion:
    """A loaded Stable Diffusion model: call ``from_pretrained``, then encode, denoise and decode."""
    configs: ModelConfigs
    params: dict[str, Any]
    tokenizer: Any = None
    tokenizer_dir: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # the UNet's attention; auto: the fused kernel of the default devices' platform
    tokenizer_2: Any = None  # SDXL's second tokenizer (text_encoder_2's)
    tokenizer_2_dir: str | None = None

    def __post_init__(self):
        nets = sources.generation_networks(self.configs, self.dtype, self.param_dtype, self.attention,
                                           jax.devices()[0].platform)
        self.unet, self.vae, self.text_encoder = nets.unet, nets.vae, nets.text_encoder  # the VAE runs in f32
        self._text = jax.jit(lambda p, ids, ids_2: generate.encode_text(nets, p, ids, ids_2))
        self._unet = jax.jit(lambda p, x, t, c, added: self.unet.apply({"params": p}, x, t, c, added))
        self._enc = jax.jit(lambda p, x: self.vae.apply({"params": p}, x, method=AutoencoderKL.encode))
        self._dec = jax.jit(lambda p, z: self.vae.apply({"params": p}, z, method=AutoencoderKL.decode))
        self.generator = generate.Generator(nets, self.configs.scheduler)

    @property
    def downsample_factor(self) -> int:
        return self.configs.vae.downsample_factor

    @property
    def scaling_factor(self) -> float:
        return self.configs.vae.scaling_factor

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: Any = jnp.float32, *, param_dtype: Any = jnp.float32,
                        tokenizer: str | None = None, prediction_type: str | None = None,
                        allow_pickle: bool = False, variant: str | None = None, revision: str | None = None,
                        single_file_options: dict[str, Any] | None = None,
                        attention: str = "auto") -> "StableDiffusion":
        """Load a diffusers folder, a single-file SD checkpoint, or an sdjax export: a local path, a
        ``gs://`` one, or a hub id (``org/name``, ``org/name/FILE.safetensors``, ``@REVISION`` or
        ``revision=``) resolved through huggingface_hub's cache (``sdjax.checkpoints.hub``).

        ``tokenizer``: a folder with the CLIP tokenizer files, needed for single files (they carry none);
        for SDXL, a diffusers SDXL folder (its ``tokenizer/`` and ``tokenizer_2/``).
        ``prediction_type``: "epsilon" or "v_prediction"; single files cannot tell (SD 2.x 768-v models
        are v-prediction), folders read it from scheduler/scheduler_config.json.
        ``single_file_options``: what a single file's tensors cannot say, passed to
        ``single_file.infer_configs`` (image_size, norm_num_groups, unet_heads, text_heads).
        ``attention``: the UNet's attention (``sdjax.models.layers.ATTENTION``); auto: the fused kernel of
        the default devices' platform.
        """
        loaded = load_lib.load(path, param_dtype=param_dtype, prediction_type=prediction_type,
                               allow_pickle=allow_pickle, variant=variant, revision=revision,
                               single_file_options=single_file_options)
        tokenizer_dir = tokenizer or loaded.tokenizer_dir
        tokenizer_2_dir = loaded.tokenizer_2_dir
        if tokenizer and os.path.isdir(os.path.join(tokenizer, "tokenizer_2")):  # an SDXL folder's tokenizers
            tokenizer_2_dir = os.path.join(tokenizer, "tokenizer_2")
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir and loaded.configs.text_encoder else None
        tok_2 = load_tokenizer(tokenizer_2_dir) if tokenizer_2_dir and loaded.configs.text_encoder_2 else None
        return cls(loaded.configs, loaded.params, tok, tokenizer_dir, dtype, param_dtype, attention, tok_2,
                   tokenizer_2_dir)

    def save_pretrained(self, path: str, format: str = "sdjax", dtype: Any = None) -> None:
        """Write the model: ``format="sdjax"`` (Orbax params + JSON configs + tokenizer, loads back
        bit-exact), ``"diffusers"`` (a folder ``StableDiffusionPipeline.from_pretrained`` loads) or
        ``"single_file"`` (one ``.safetensors`` in the original CompVis/Stability layout for A1111,
        ComfyUI and diffusers' ``from_single_file``). ``dtype`` (``jnp.float16``, ``jnp.bfloat16``)
        writes a half-precision copy."""
        export.save(path, self.configs, self.params, self.tokenizer_dir, format=format, dtype=dtype,
                    tokenizer_2_dir=self.tokenizer_2_dir)

    def with_lora(self, path: str, scale: float = 1.0) -> "StableDiffusion":
        """A copy with the LoRA adapter at ``path`` merged into its weights at ``scale`` (this model is
        untouched; chain calls for several LoRAs). Layouts: diffusers/PEFT and kohya/A1111, UNet and
        text encoder, attention, projections, feed-forward and convs (see ``sdjax.checkpoints.lora``). The copy
        shares this model's compiled functions: a LoRA, or another scale, never recompiles."""
        merged = copy.copy(self)
        merged.params = lora.merge(self.params, lora_files.read(path), scale, what=f"LoRA {path}")
        return merged

    # ---- the networks ----------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], encoder: int = 1) -> np.ndarray:
        """Token ids (B, 77) for text encoder ``encoder`` (SDXL's second: 2)."""
        tokenizer = self.tokenizer if encoder == 1 else self.tokenizer_2
        if tokenizer is None:
            folder = "tokenizer/" if encoder == 1 else "tokenizer_2/"
            raise ValueError(f"This model has no tokenizer for text encoder {encoder}: load a diffusers folder with "
                             f"{folder}, or pass tokenizer=DIR to from_pretrained (a folder with vocab.json and "
                             "merges.txt).")
        config = self.configs.text_encoder if encoder == 1 else self.configs.text_encoder_2
        return tokenize(tokenizer, list(prompts), config.max_position_embeddings)

    def encode_prompt(self, prompts: Sequence[str]) -> jax.Array:
        """Text context (B, 77, D) for a list of prompts (SDXL: both encoders', concatenated)."""
        return self.encode_ids(self._ids_1(prompts), self._ids_2(prompts))

    def encode_ids(self, ids_BL: Any, ids_2_BL: Any = None) -> jax.Array:
        ids, ids_2 = (None if x is None else jnp.asarray(x, jnp.int32) for x in (ids_BL, ids_2_BL))
        return self._text(self.params, ids, ids_2)[0]

    def _ids_1(self, prompts: Sequence[str]) -> np.ndarray | None:
        return self.tokenize(prompts) if self.configs.text_encoder else None

    def _ids_2(self, prompts: Sequence[str]) -> np.ndarray | None:
        return self.tokenize(prompts, encoder=2) if self.configs.text_encoder_2 else None

    def unet_apply(self, latents_BhwC: jax.Array, timesteps: Any, ctx_BLD: jax.Array,
                   added: Any = None) -> jax.Array:
        """One UNet evaluation: model output (epsilon, v or x0) with the latents' shape; ``added``: SDXL's
        pooled text embedding and micro-conditioning numbers (``sdjax.models.unet.AddedCond``)."""
        t = jnp.broadcast_to(jnp.asarray(timesteps), (latents_BhwC.shape[0],))
        return self._unet(self.params["unet"], jnp.asarray(latents_BhwC, self.dtype), t,
                          jnp.asarray(ctx_BLD, self.dtype), added)

    def vae_encode(self, images_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images in [-1, 1] -> (mean, logvar) of the unscaled latent posterior."""
        self._check_image_size(images_BHWC)
        posterior = self._enc(self.params["vae"], jnp.asarray(images_BHWC, jnp.float32))
        return posterior.mean, posterior.logvar

    def vae_decode(self, latents_BhwC: jax.Array) -> jax.Array:
        """Unscaled latents -> images in [-1, 1] (values may overshoot slightly; clip for display)."""
        return self._dec(self.params["vae"], jnp.asarray(latents_BhwC, jnp.float32))

    def _check_image_size(self, images_BHWC: Any) -> None:
        shape = np.shape(images_BHWC)
        f = self.downsample_factor
        if len(shape) != 4 or shape[-1] != self.configs.vae.in_channels or shape[1] % f or shape[2] % f:
            raise ValueError(f"images must be (B, H, W, {self.configs.vae.in_channels}) NHWC with H and W multiples "
                             f"of {f}; got {shape}. Resize or crop them first.")

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (the UNet's sample size times the VAE factor)."""
        return self.configs.unet.sample_size * self.downsample_factor

    # ---- generation ------------------------------------------------------------------------
    def txt2img(self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
                refiner: "StableDiffusion | None" = None, high_noise_frac: float = 0.8, **options: Any) -> Any:
        """Images (B, H, W, 3) for ``prompts``: uint8, or float in [0, 1] with ``output="float"``.

        ``options``: the fields of ``sdjax.options.SamplingOptions`` (``steps``, ``guidance_scale``,
        ``eta``, ``sampler``, ``height``, ``width`` (default: the model's native size, 512 for SD 1.x,
        768 for SD 2.x 768-v, 1024 for SDXL), ``seed``, ``init_latents`` (B, H/f, W/f, C) replacing the
        seed-drawn starting noise, ``output``, SDXL's micro-conditioning), or diffusers' names for them
        (``num_inference_steps``, ``latents``, ``negative_prompt``).

        ``refiner``: an SDXL refiner that takes over at ``high_noise_frac`` of the noise schedule, as
        diffusers' ensemble of experts (this model runs with ``denoising_end=high_noise_frac`` and
        hands its latents, on the device, to ``refiner.img2img(latents, ...,
        denoising_start=high_noise_frac)``); both take the same options.
        """
        if refiner is None:
            return self._generate(options, prompts, negative_prompts)
        if not (self.configs.is_sdxl and refiner.configs.is_sdxl):
            raise ValueError("refiner= hands an SDXL base's latents to an SDXL refiner; "
                             "these models are not both SDXL.")
        for name in ("denoising_start", "denoising_end"):
            if name in options:
                raise TypeError(f"{name} is set by high_noise_frac when a refiner is given; give high_noise_frac.")
        latents = self._generate(dict(options, denoising_end=high_noise_frac, output="latent"), prompts,
                                 negative_prompts)
        rest = {k: v for k, v in options.items() if k not in ("init_latents", "latents", "height", "width", "strength")}
        return refiner.img2img(latents, prompts, negative_prompts=negative_prompts, denoising_start=high_noise_frac,
                               **rest)

    def img2img(self, init_images: Any, prompts: str | Sequence[str], strength: float = 0.75,
                negative_prompts: str | Sequence[str] | None = None, **options: Any) -> np.ndarray:
        """Img2Img: encode ``init_images`` (uint8, float in [0, 1], or PIL images), noise them to the
        step that ``strength`` selects, and run the remaining steps. The size is the images' own;
        ``options`` as for ``txt2img``. ``init_images`` may instead be latents (B, H/f, W/f, C), as
        ``txt2img(..., output="latent")`` returns them; with ``denoising_start`` they are continued as
        they are (SDXL's refiner after the base's ``denoising_end``)."""
        return self._generate(dict(options, strength=strength), prompts, negative_prompts, init_images)

    def inpaint(self, images: Any, masks: Any, prompts: str | Sequence[str],
                negative_prompts: str | Sequence[str] | None = None, strength: float = 1.0,
                **options: Any) -> np.ndarray:
        """Repaint the masked part of ``images`` (uint8, float in [0, 1], or PIL images) as ``prompts`` ask.

        ``masks``: (B, H, W), (B, H, W, 1) or PIL images, white / 1 = repaint, binarised at 0.5; the
        masked image keeps the pixels where the mask is below 0.5. An inpainting checkpoint (9-channel
        UNet) reads the mask and the masked image's latents; a plain model keeps the known region by
        blending its latents, noised to the current step, back in after every step. ``strength`` < 1
        starts from the noised image as img2img does. The size is the images' own; ``options`` as for
        ``txt2img``.
        """
        return self._generate(dict(options, strength=strength), prompts, negative_prompts, images, masks)

    @property
    def is_inpainting_model(self) -> bool:
        """A UNet that reads the mask and the masked image's latents beside the noisy latents (9 channels)."""
        return self._model.is_inpainting

    @property
    def _model(self) -> options_lib.Model:
        return options_lib.Model(downsample_factor=self.downsample_factor,
                                 latent_channels=self.configs.vae.latent_channels,
                                 unet_in_channels=self.configs.unet.in_channels, native_size=self.native_size,
                                 micro_conditioning=self.configs.is_sdxl,
                                 force_zeros_for_empty_prompt=self.configs.force_zeros_for_empty_prompt,
                                 requires_aesthetics_score=self.configs.requires_aesthetics_score,
                                 scheduler=self.configs.scheduler)

    def inputs(self, request: options_lib.Request) -> generate.Inputs:
        """The compiled generation's per-image arrays for a checked request (the prompts tokenized)."""
        return generate.Inputs(self._ids_1(request.prompts), self._ids_1(request.negative_prompts),
                               request.noise, request.init_images, request.posterior_noise, request.masks,
                               request.masked_posterior_noise, self._ids_2(request.prompts),
                               self._ids_2(request.negative_prompts), request.time_ids, request.uncond_time_ids,
                               request.uncond_keep, request.start_latents)

    def _generate(self, options: dict[str, Any], prompts, negative_prompts, images=None, masks=None) -> np.ndarray:
        if "negative_prompt" in options:  # diffusers' name
            if negative_prompts is not None:
                raise TypeError("'negative_prompt' and 'negative_prompts' are the same option; give one of them.")
            negative_prompts = options.pop("negative_prompt")
        opts = options_lib.SamplingOptions.from_kwargs(**options)
        request = opts.request(self._model, prompts, negative_prompts, images, masks)
        inputs = self.inputs(request)
        out = self.generator(self.params, inputs, sampler=opts.sampler, steps=opts.steps, eta=opts.eta,
                             guidance_scale=opts.guidance_scale, seed=opts.seed, scaling_factor=self.scaling_factor,
                             span=request.span, guidance_rescale=opts.guidance_rescale)
        return images_lib.to_uint8(out) if opts.output == "uint8" else out
