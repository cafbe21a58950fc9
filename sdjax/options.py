"""What one Text2Img, Img2Img or inpainting call asks for, checked once against the model.

``SamplingOptions`` holds the settings (``from_kwargs`` also takes diffusers' names for them);
``SamplingOptions.request`` checks them with the prompts, images and masks against what the model
reads and returns a ``Request``: every per-image array the compiled generation takes, with the
starting noise drawn. Every user error raises here, naming the value and the fix, before any
compile.
"""

import dataclasses
from typing import Any, Sequence

import numpy as np

from sdjax import generate, images as images_lib
from sdjax.samplers import denoising_span, get_sampler, img2img_start

# diffusers' pipeline argument -> the sdjax option it means the same as (StableDiffusion's methods also
# take diffusers' negative_prompt for negative_prompts).
ALIASES = {"num_inference_steps": "steps", "latents": "init_latents"}


@dataclasses.dataclass(frozen=True)
class Model:
    """What the checks need to know of a model."""
    downsample_factor: int
    latent_channels: int
    unet_in_channels: int
    native_size: int
    micro_conditioning: bool = False  # SDXL: the UNet reads the image's original size, crop and target size
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False  # SDXL refiner: an aesthetic score instead of the target size
    scheduler: Any = None  # its SchedulerConfig: where denoising_start / denoising_end fall among the steps

    @property
    def is_inpainting(self) -> bool:
        """A UNet that reads the mask and the masked image's latents beside the noisy latents (9 channels)."""
        return self.unet_in_channels == 2 * self.latent_channels + 1


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked call: prompts and the per-image arrays, and the span of sampler steps to run."""
    prompts: list[str]
    negative_prompts: list[str]
    noise: np.ndarray  # (B, h, w, C) starting latents
    init_images: np.ndarray | None  # (B, H, W, 3) in [-1, 1]
    posterior_noise: np.ndarray | None
    masks: np.ndarray | None  # (B, H, W, 1) in {0, 1}
    masked_posterior_noise: np.ndarray | None
    time_ids: np.ndarray | None = None  # (B, 6) SDXL's micro-conditioning of the prompt
    uncond_time_ids: np.ndarray | None = None  # (B, 6) and of the negative prompt
    uncond_keep: np.ndarray | None = None  # (B,) 0 where the negative conditioning is zero (no negative prompt)
    start_latents: Any = None  # (B, h, w, C) latents given in place of init images
    span: generate.Span = generate.Span()  # the steps to run (img2img's start from strength or denoising_start)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """The settings of one generation call.

    ``steps`` (diffusers: ``num_inference_steps``) sampler steps; ``guidance_scale`` of
    classifier-free guidance; ``eta`` (DDIM's noise); ``sampler``: ddim, dpm++2m, euler, euler_a;
    ``height``/``width``: None is the model's native size (Text2Img) or the images' own (Img2Img,
    inpainting); ``seed``; ``init_latents`` (diffusers: ``latents``) (B, H/f, W/f, C) replaces the
    seed-drawn starting noise; ``strength`` in (0, 1]: how far Img2Img and inpainting noise the
    images (1: from pure noise); ``output``: "uint8", "float" (in [0, 1]) or "latent" (the latents
    (B, H/f, W/f, C) as a jax.Array, not decoded, for a next call to continue from).

    ``denoising_end`` in (0, 1): stop where that fraction of the noise schedule is done (with
    ``output="latent"``: SDXL's base in diffusers' ensemble of experts); ``denoising_start``: Img2Img
    that starts there, on latents or images as they are, not noised (the refiner continuing the base's
    latents). ``guidance_rescale`` in [0, 1]: diffusers' rescaling of the guided prediction (Lin et al.
    2023); ``clip_skip``: the prompt's text context from that many encoder layers before the model's
    own (as diffusers, the negative prompt's stays the model's own).

    SDXL's micro-conditioning, as diffusers' SDXL pipelines take it, each (height, width) or (top, left)
    pixels: ``original_size`` and ``target_size`` (default: the output size), ``crops_coords_top_left``
    (default (0, 0)); the refiner's ``aesthetic_score`` (6.0) in place of the target size; the negative
    prompt's ``negative_*``, each the prompt's own unless given (``negative_aesthetic_score``: 2.5).
    diffusers' pipelines differ at the edges: its Text2Img reads the negative numbers only when both
    negative sizes are given, and its refiner's negative crop defaults to (0, 0). They are traced:
    other numbers never recompile.
    """
    steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    sampler: str = "ddim"
    height: int | None = None
    width: int | None = None
    seed: int = 0
    init_latents: Any = None
    strength: float = 1.0
    output: str = "uint8"
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    denoising_start: float | None = None
    denoising_end: float | None = None
    guidance_rescale: float = 0.0
    clip_skip: int = 0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "SamplingOptions":
        """The options from keyword arguments, sdjax's names or diffusers' (``ALIASES``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in kwargs.items():
            name = ALIASES.get(key, key)
            if name not in names:
                raise TypeError(f"unknown option {key!r}; valid: {', '.join(sorted(names | set(ALIASES)))}.")
            if name in values:
                raise TypeError(f"{key!r} and {name!r} are the same option; give one of them.")
            values[name] = value
        return cls(**values)

    def request(self, model: Model, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None,
                images: Any = None, masks: Any = None) -> Request:
        """Checks everything against ``model`` and draws the starting noise (see ``generate``'s streams)."""
        if self.output not in ("uint8", "float", "latent"):
            raise ValueError(f"output must be 'uint8', 'float' or 'latent', got {self.output!r}.")
        if masks is None and model.is_inpainting:
            raise ValueError("this is an inpainting model (its UNet reads a mask and a masked image): call "
                             "inpaint(images, masks, prompts) (command line: sdjax-inpaint).")
        if masks is not None and model.unet_in_channels not in (model.latent_channels, 2 * model.latent_channels + 1):
            raise ValueError(f"this UNet reads {model.unet_in_channels} channels: neither a plain "
                             f"({model.latent_channels}) nor an inpainting ({2 * model.latent_channels + 1}) model.")
        if masks is not None and (self.denoising_start is not None or self.denoising_end is not None):
            raise ValueError("denoising_start / denoising_end are for txt2img and img2img; inpainting runs every step.")
        if images is None and self.denoising_start is not None:
            raise ValueError("denoising_start continues from latents or images: call img2img(latents, prompts, "
                             "denoising_start=...) with txt2img(..., denoising_end=..., output='latent')'s latents.")
        start_latents = None
        if is_latents(images, model.latent_channels):
            if masks is not None:
                raise ValueError(f"inpainting reads images, not latents (an array with {model.latent_channels} "
                                 "channels); pass the images.")
            start_latents, images = images, None
        init = None if images is None else images_lib.as_image_array(images)
        height, width = self.height, self.width
        if start_latents is not None:
            f = model.downsample_factor
            latent_size = (np.shape(start_latents)[1] * f, np.shape(start_latents)[2] * f)
            if (height or latent_size[0], width or latent_size[1]) != latent_size:
                raise ValueError(f"the latents are for {latent_size[1]}x{latent_size[0]} images but height x width "
                                 f"is {width}x{height}; leave height and width out.")
            height, width = latent_size
        if height is None:
            height = model.native_size if init is None else init.shape[1]
        if width is None:
            width = model.native_size if init is None else init.shape[2]
        self._check_values(model.downsample_factor, height, width, init is not None or start_latents is not None)
        prompts, negative = _prompts(prompts, negative_prompts)
        n, f, c = len(prompts), model.downsample_factor, model.latent_channels
        latent_shape = (height // f, width // f, c)
        if self.init_latents is None:
            noise = generate.starting_noise(self.seed, n, latent_shape)
        else:
            noise = np.asarray(self.init_latents, np.float32)
            if noise.shape != (n,) + latent_shape:
                raise ValueError(f"init_latents must have shape {(n,) + latent_shape} (B, H/{f}, W/{f}, C) for "
                                 f"{n} prompts at {height}x{width}; got {noise.shape}.")
        posterior_noise = masked_noise = None
        start = 0
        if start_latents is not None:
            start_latents = _one_per_prompt(start_latents, n, "latents")
            start = img2img_start(self.steps, self.strength)
        if init is not None:
            if init.shape[1:3] != (height, width):
                raise ValueError(f"init images are {init.shape[2]}x{init.shape[1]} but height x width is "
                                 f"{width}x{height}; resize them or pass matching height/width.")
            init = _one_per_prompt(init, n, "init images") * 2.0 - 1.0
            posterior_noise = generate.starting_noise(self.seed, n, latent_shape, generate.POSTERIOR_STREAM)
            start = img2img_start(self.steps, self.strength)
        if masks is not None:
            masks = images_lib.as_mask_array(masks)
            if masks.shape[1:] != (height, width):
                raise ValueError(f"masks are {masks.shape[2]}x{masks.shape[1]} but the images are {width}x{height}; "
                                 "give masks the images' size.")
            masks = (_one_per_prompt(masks, n, "masks") >= 0.5).astype(np.float32)[..., None]  # as diffusers binarises
            if model.is_inpainting:
                masked_noise = generate.starting_noise(self.seed, n, latent_shape, generate.MASKED_POSTERIOR_STREAM)
        time_ids = uncond_time_ids = keep = None
        if model.micro_conditioning:
            time_ids, uncond_time_ids = self._time_ids(n, height, width, model.requires_aesthetics_score)
            zero = negative_prompts is None and model.force_zeros_for_empty_prompt
            keep = np.full((n,), 0.0 if zero else 1.0, np.float32)
        else:
            self._check_no_micro_conditioning()
        span = self._span(model, start)
        return Request(prompts, negative, noise, init, posterior_noise, masks, masked_noise, time_ids,
                       uncond_time_ids, keep, start_latents, span)

    def _span(self, model: Model, start: int) -> generate.Span:
        if not isinstance(self.clip_skip, (int, np.integer)) or self.clip_skip < 0:
            raise ValueError(f"clip_skip must be an integer >= 0, got {self.clip_skip!r}.")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}.")
        stop = None
        if self.denoising_start is not None or self.denoising_end is not None:
            timesteps = get_sampler(self.sampler).make_plan(model.scheduler, self.steps, eta=self.eta).timesteps
            start, stop = denoising_span(np.asarray(timesteps), model.scheduler.num_train_timesteps, start,
                                         self.denoising_start, self.denoising_end)
        return generate.Span(start, stop, add_noise=self.denoising_start is None, decode=self.output != "latent",
                             clip_skip=int(self.clip_skip))

    _MICRO = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
              "negative_crops_coords_top_left", "negative_target_size")

    def _time_ids(self, n: int, height: int, width: int, aesthetic: bool) -> tuple[np.ndarray, np.ndarray]:
        """SDXL's numbers for the prompt and the negative prompt, as diffusers' ``_get_add_time_ids``: original
        size, crop top-left, then the target size (base) or the aesthetic score (refiner)."""
        for name in self._MICRO:
            value = getattr(self, name)
            if value is not None and (len(value) != 2
                                      or not all(isinstance(v, (int, float, np.number)) for v in value)):
                raise ValueError(f"{name} must be two numbers ((height, width) or (top, left)), got {value!r}.")
        original, target = self.original_size or (height, width), self.target_size or (height, width)
        ids = (*original, *self.crops_coords_top_left, *((self.aesthetic_score,) if aesthetic else target))
        negative_last = (self.negative_aesthetic_score,) if aesthetic else (self.negative_target_size or target)
        uncond = (*(self.negative_original_size or original),
                  *(self.negative_crops_coords_top_left or self.crops_coords_top_left), *negative_last)
        return np.tile(np.asarray(ids, np.float32), (n, 1)), np.tile(np.asarray(uncond, np.float32), (n, 1))

    def _check_no_micro_conditioning(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        given = [name for name in self._MICRO + ("aesthetic_score", "negative_aesthetic_score")
                 if getattr(self, name) != defaults[name]]
        if given:
            raise ValueError(f"{', '.join(given)}: only SDXL models read micro-conditioning; this model does not.")

    def _check_values(self, downsample_factor: int, height: int, width: int, editing: bool) -> None:
        get_sampler(self.sampler)
        if not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}.")
        multiple = max(8, downsample_factor)
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % multiple:
                raise ValueError(
                    f"{name} must be a positive multiple of {multiple}, got {v!r}; "
                    f"try {max(multiple, round(v / multiple) * multiple) if isinstance(v, (int, float)) else 512}.")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}.")
        if editing and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}.")


def is_latents(images: Any, latent_channels: int) -> bool:
    """Latents (B, h, w, C) given where images may be (as diffusers' img2img reads a 4-channel input):
    a 4-D array (numpy or jax) whose last axis is the latent channel count (images have 3)."""
    return (latent_channels != 3 and not images_lib.is_pil(images) and not isinstance(images, (list, tuple))
            and np.ndim(images) == 4 and np.shape(images)[-1] == latent_channels)


def _prompts(prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (an empty string is fine).")
    if negative_prompts is None:
        return prompts, [""] * len(prompts)
    negative = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(negative) == 1:
        negative = negative * len(prompts)
    if len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one, or one per prompt.")
    return prompts, negative


def _one_per_prompt(arr: np.ndarray, n: int, what: str) -> np.ndarray:
    """One entry for each of ``n`` prompts: a single one is repeated."""
    if arr.shape[0] == 1 and n > 1:
        arr = np.repeat(arr, n, axis=0)
    if arr.shape[0] != n:
        raise ValueError(f"{arr.shape[0]} {what} for {n} prompts; give one, or one per prompt.")
    return arr
