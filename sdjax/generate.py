"""Text2Img, Img2Img and inpainting: text encoding, guided sampling and decoding in one compiled function.

``generate`` is that function, pure and jittable: the Stable Diffusion API and the trainers'
sample grids both call it. ``Generator`` compiles it once per (batch, size, steps, sampler,
``Span``) with the batch sharded over every device of a 1-D ``data`` mesh
(``sharding.data_mesh``); a batch that does not divide the device count is padded, then
trimmed. Inpainting follows diffusers' ``StableDiffusionInpaintPipeline``: a 9-channel UNet reads
the mask and the masked image's latents beside the noisy latents; a plain 4-channel UNet has the
known region's latents, noised to the current step, blended back in after every step. A span of
the steps with latents out and latents in is SDXL's base and refiner as an ensemble of experts
(diffusers' ``denoising_end`` / ``denoising_start``). ``guidance_scale``, ``guidance_rescale``,
``eta`` and the latent scale are traced, so changing them never recompiles.

The user's inputs are checked, and the starting noise drawn, by ``sdjax.options`` before they
reach this module.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax import sharding
from sdjax.models.autoencoder import AutoencoderKL
from sdjax.models.text_encoder import CLIPTextEncoder
from sdjax.models.unet import AddedCond, UNet
from sdjax.samplers import get_sampler


@dataclasses.dataclass(frozen=True)
class Networks:
    """The modules a generation runs (static: hashed into the compiled function)."""
    unet: UNet
    vae: AutoencoderKL  # f32: the decoder stays in f32 when the rest runs in half precision
    text_encoder: CLIPTextEncoder | None  # None: SDXL's refiner
    text_encoder_2: CLIPTextEncoder | None = None  # SDXL's OpenCLIP ViT-bigG


@flax.struct.dataclass
class Inputs:
    """The per-image arrays of one generation call, each with the batch as its leading axis."""
    cond_ids: jax.Array | None  # (B, L) prompt token ids (None: a model without the first text encoder)
    uncond_ids: jax.Array | None  # (B, L) negative-prompt token ids
    noise: jax.Array  # (B, h, w, C) starting latents
    init_images: jax.Array | None = None  # (B, H, W, 3) in [-1, 1]: Img2Img and inpainting
    posterior_noise: jax.Array | None = None  # (B, h, w, C): the init images' latent sample
    masks: jax.Array | None = None  # (B, H, W, 1) in {0, 1}, 1 = repaint: inpainting
    masked_posterior_noise: jax.Array | None = None  # (B, h, w, C): the masked images' latent sample (9-channel UNet)
    # SDXL: the second tokenizer's ids, the micro-conditioning numbers of the prompt and of the negative
    # prompt (B, 6; refiner: 5), and 1 where the negative prompt conditions, 0 where its conditioning is
    # zero (B,).
    cond_ids_2: jax.Array | None = None
    uncond_ids_2: jax.Array | None = None
    time_ids: jax.Array | None = None
    uncond_time_ids: jax.Array | None = None
    uncond_keep: jax.Array | None = None
    # (B, h, w, C) latents to start from in place of encoding init_images: an earlier call's
    # output="latent" (SDXL's refiner continuing the base's denoising), or latents a user encoded.
    start_latents: jax.Array | None = None

    def padded(self, multiple: int) -> "Inputs":
        """Every array padded along the batch (repeating the last row) to a multiple of ``multiple``."""
        return jax.tree.map(lambda x: pad_batch(x, multiple), self)

    def shardings(self, mesh: Mesh) -> "Inputs":
        """The batch axis of every array split over the mesh's ``data`` axis."""
        return jax.tree.map(lambda _: NamedSharding(mesh, P("data")), self)


def pad_batch(x: Any, multiple: int) -> Any:
    """``x`` padded along its first axis to a multiple of ``multiple``: on the device for a jax.Array (a
    previous call's latents stay there), else as a numpy array."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x)
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    return xp.concatenate([x, xp.repeat(x[-1:], pad, axis=0)], axis=0)


# Independent random streams derived from one seed.
SAMPLER_STREAM, POSTERIOR_STREAM, MASKED_POSTERIOR_STREAM = 1 << 20, 1 << 21, 1 << 22


@functools.partial(jax.jit, static_argnums=1)
def _standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # Module-level so that it compiles once per shape, not on every call of starting_noise.
    return jax.random.normal(key, shape, jnp.float32)


def starting_noise(seed: int, count: int, shape: tuple[int, ...], stream: int = 0, first: int = 0) -> np.ndarray:
    """Standard-normal latents of images ``first`` to ``first + count - 1``; image j's noise depends
    only on (seed, stream, j)."""
    root = jax.random.fold_in(jax.random.key(seed), stream) if stream else jax.random.key(seed)
    return np.stack([np.asarray(_standard_normal(jax.random.fold_in(root, j), tuple(shape)))
                     for j in range(first, first + count)])


def encode_text(nets: Networks, params: dict[str, Any], ids_BL: jax.Array | None, ids_2_BL: jax.Array | None,
                clip_skip: int = 0) -> tuple[jax.Array, jax.Array]:
    """(context, pooled): the text encoders' contexts concatenated on features (SD 1/2: one encoder;
    SDXL: CLIP ViT-L's then ViT-bigG's; SDXL's refiner: ViT-bigG's), and the last encoder's pooled
    embedding. ``clip_skip``: the context from that many layers before the usual one (diffusers' count)."""
    encodings = []
    if nets.text_encoder is not None:
        encodings.append(nets.text_encoder.apply({"params": params["text_encoder"]}, ids_BL, clip_skip))
    if nets.text_encoder_2 is not None:
        encodings.append(nets.text_encoder_2.apply({"params": params["text_encoder_2"]}, ids_2_BL, clip_skip))
    return jnp.concatenate([e.context_BLD for e in encodings], axis=-1), encodings[-1].pooled_BP


def guided_model_fn(unet: UNet, unet_params: Any, ctx_2BLD: jax.Array, guidance_scale: jax.Array,
                    extra_BhwE: jax.Array | None = None, added: AddedCond | None = None,
                    guidance_rescale: jax.Array | None = None) -> Callable:
    """Classifier-free guidance: ``model_fn(x, t)`` runs the UNet once on [x; x] against the
    context [uncond; cond] and returns uncond + guidance_scale * (cond - uncond), in f32.
    ``extra_BhwE``: channels appended to x's (an inpainting UNet's mask and masked-image latents);
    ``added``: SDXL's added conditioning, [uncond; cond] too. ``guidance_rescale`` > 0 mixes in the
    guided output rescaled to the conditional one's standard deviation (``rescale_guidance``)."""
    dtype = unet.dtype
    ctx = ctx_2BLD.astype(dtype)

    def model_fn(x_BhwC: jax.Array, t_B: jax.Array) -> jax.Array:
        x_in = x_BhwC if extra_BhwE is None else jnp.concatenate([x_BhwC, extra_BhwE.astype(x_BhwC.dtype)], axis=-1)
        x2 = jnp.concatenate([x_in, x_in]).astype(dtype)
        out = unet.apply({"params": unet_params}, x2, jnp.concatenate([t_B, t_B]), ctx, added).astype(jnp.float32)
        out_uncond, out_cond = jnp.split(out, 2)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        return guided if guidance_rescale is None else rescale_guidance(guided, out_cond, guidance_rescale)

    return model_fn


def rescale_guidance(guided: jax.Array, cond: jax.Array, rescale: jax.Array) -> jax.Array:
    """Lin et al. 2023 (sec. 3.4), as diffusers' ``rescale_noise_cfg``: ``rescale`` of the guided output
    scaled to the conditional output's per-image standard deviation, plus (1 - ``rescale``) of it as it is.
    0 leaves it untouched."""
    axes = tuple(range(1, guided.ndim))
    ratio = jnp.std(cond, axis=axes, keepdims=True, ddof=1) / jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    return jnp.where(rescale > 0, rescale * guided * ratio + (1.0 - rescale) * guided, guided)


def generate(nets: Networks, sampler_name: str, start_index: int, params: dict[str, Any], inputs: Inputs,
             key: jax.Array, plan: Any, guidance_scale: jax.Array, scaling_factor: jax.Array,
             guidance_rescale: jax.Array | None = None, *, unroll: bool = False, stop_index: int | None = None,
             add_noise: bool = True, decode: bool = True, clip_skip: int = 0) -> jax.Array:
    """The whole generation: ids -> context -> guided sampling -> f32 decode -> [0, 1] images.

    ``params`` = {"unet", "vae", "text_encoder"} (SDXL: and "text_encoder_2"); ``plan`` comes from the sampler's
    ``make_plan``; ``start_index`` > 0 (Img2Img) starts from ``inputs.init_images`` (or ``inputs.start_latents``)
    noised to that step, or, with ``add_noise=False``, from them as they are; with ``inputs.masks`` it
    inpaints (see the module docstring). ``stop_index``: the step to stop before (default: after the
    last); ``decode=False`` returns the latents (B, h, w, C) in place of images. ``unroll``: the
    sampler's steps written out instead of one loop (for cost analysis, which counts a loop's body once).
    """
    sampler = get_sampler(sampler_name)
    if clip_skip == 0:
        both = lambda uncond, cond: None if cond is None else jnp.concatenate([uncond, cond])  # noqa: E731
        ctx, pooled = encode_text(nets, params, both(inputs.uncond_ids, inputs.cond_ids),
                                  both(inputs.uncond_ids_2, inputs.cond_ids_2))
    else:  # as diffusers' pipelines: the prompt's context skips layers, the negative prompt's does not
        halves = (encode_text(nets, params, inputs.uncond_ids, inputs.uncond_ids_2),
                  encode_text(nets, params, inputs.cond_ids, inputs.cond_ids_2, clip_skip))
        ctx, pooled = (jnp.concatenate(parts) for parts in zip(*halves))
    added = None
    if nets.unet.config.addition_embed_type:
        keep_2B = jnp.concatenate([inputs.uncond_keep, jnp.ones_like(inputs.uncond_keep)])
        ctx, pooled = ctx * keep_2B[:, None, None], pooled * keep_2B[:, None]
        added = AddedCond(pooled, jnp.concatenate([inputs.uncond_time_ids, inputs.time_ids]))

    def encode(images_BHWC: jax.Array, noise_BhwC: jax.Array) -> jax.Array:
        post = nets.vae.apply({"params": params["vae"]}, images_BHWC, method=AutoencoderKL.encode)
        return (post.mean + post.std * noise_BhwC) * scaling_factor

    extra, after_step, x0 = None, None, None
    inpainting_unet = nets.unet.config.in_channels != inputs.noise.shape[-1]
    if inputs.start_latents is not None:
        x0 = inputs.start_latents.astype(jnp.float32)
    elif inputs.init_images is not None and (inputs.masks is None or start_index > 0 or not inpainting_unet):
        x0 = encode(inputs.init_images, inputs.posterior_noise)
    if inputs.masks is not None:
        f = inputs.masks.shape[1] // inputs.noise.shape[1]
        mask_Bhw1 = inputs.masks[:, ::f, ::f, :]  # nearest neighbour, as torch's interpolate
        if inpainting_unet:
            masked = encode(inputs.init_images * (inputs.masks < 0.5), inputs.masked_posterior_noise)
            extra = jnp.concatenate([mask_Bhw1, masked], axis=-1)
        else:
            after_step = functools.partial(_keep_known_region, sampler, plan, x0, inputs.noise, mask_Bhw1)
        x0 = x0 if start_index > 0 else None  # strength 1 starts from pure noise
    model_fn = guided_model_fn(nets.unet, params["unet"], ctx, guidance_scale, extra, added, guidance_rescale)
    latents = sampler.sample(model_fn, inputs.noise, key, plan, start_index=start_index, stop_index=stop_index, x0=x0,
                             add_noise=add_noise, after_step=after_step, unroll=unroll)
    if not decode:
        return latents
    images = nets.vae.apply({"params": params["vae"]}, latents / scaling_factor, method=AutoencoderKL.decode)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


def _keep_known_region(sampler: Any, plan: Any, x0: jax.Array, noise: jax.Array, mask_Bhw1: jax.Array,
                       x: jax.Array, i: jax.Array) -> jax.Array:
    """After step i, the known region (mask 0) becomes the image's latents noised to step i + 1, or the
    clean latents after the last step: diffusers' inpainting with a non-inpainting UNet."""
    last = plan.timesteps.shape[0] - 1
    known = jnp.where(i < last, sampler.noise_to(x0, noise, plan, jnp.minimum(i + 1, last)), x0)
    return (1.0 - mask_Bhw1) * known + mask_Bhw1 * x


def generate_on(mesh: Mesh, nets: Networks, sampler_name: str, start_index: int, *args, **static: Any) -> jax.Array:
    """``generate`` under ``mesh``: activation constraints and fused attention kernels (which run per
    device) split the batch over all of the mesh's axes (``data`` of an inference mesh). ``static``:
    generate's keyword-only arguments."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules((("batch", mesh.axis_names),)):
        return generate(nets, sampler_name, start_index, *args, **static)


@dataclasses.dataclass(frozen=True)
class Span:
    """What of the sampling one call runs (static: one compilation each): plan steps ``start`` to
    ``stop`` - 1 (None: to the last), the start noised (``add_noise``) or as given, decoded to images
    or returned as latents, the text context ``clip_skip`` layers early."""
    start: int = 0
    stop: int | None = None
    add_noise: bool = True
    decode: bool = True
    clip_skip: int = 0


class Generator:
    """Compiled generation for one model; one compilation per (batch, size, steps, sampler, span)."""

    def __init__(self, nets: Networks, scheduler_config, mesh: Mesh | None = None):
        self.nets = nets
        self.mesh = mesh or sharding.data_mesh()
        self.scheduler_config = scheduler_config
        self._compiled: dict[tuple, Callable] = {}

    def _fn(self, sampler: str, span: Span, inputs: Inputs) -> Callable:
        present = tuple(x is not None for x in (inputs.init_images, inputs.masks, inputs.start_latents))
        key = (sampler, span, present)
        if key not in self._compiled:
            rep = NamedSharding(self.mesh, P())
            self._compiled[key] = jax.jit(
                functools.partial(generate_on, self.mesh, self.nets, sampler, span.start, stop_index=span.stop,
                                  add_noise=span.add_noise, decode=span.decode, clip_skip=span.clip_skip),
                in_shardings=(rep, inputs.shardings(self.mesh), rep, rep, rep, rep, rep),
                out_shardings=NamedSharding(self.mesh, P("data")))
        return self._compiled[key]

    def __call__(self, params: dict[str, Any], inputs: Inputs, *, sampler: str, steps: int, eta: float,
                 guidance_scale: float, seed: int, scaling_factor: float, span: Span = Span(),
                 guidance_rescale: float = 0.0) -> Any:
        """[0, 1] float images (B, H, W, 3) as numpy, or with ``span.decode=False`` the latents (B, h, w, C)
        as a jax.Array left on the devices. Img2Img when ``inputs.init_images`` is set: its latent
        posterior is sampled as mean + std * ``inputs.posterior_noise``, then noised to plan step
        ``span.start``. Inpainting when ``inputs.masks`` is set too."""
        plan = get_sampler(sampler).make_plan(self.scheduler_config, steps, eta=eta)
        n = inputs.noise.shape[0]
        inputs = inputs.padded(self.mesh.devices.size)
        inputs = jax.device_put(inputs, inputs.shardings(self.mesh))  # a no-op for arrays already split so
        key = jax.random.fold_in(jax.random.key(seed), SAMPLER_STREAM)
        out = self._fn(sampler, span, inputs)(params, inputs, key, plan, jnp.float32(guidance_scale),
                                              jnp.float32(scaling_factor), jnp.float32(guidance_rescale))
        if not span.decode:
            return out if out.shape[0] == n else out[:n]
        return np.asarray(out)[:n]
