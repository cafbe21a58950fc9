"""Text2Img and Img2Img: text encoding, guided sampling and decoding in one compiled function.

The batch is sharded over every device on a 1-D ``data`` mesh with ``jax.jit`` and
``NamedSharding`` (no pmap); a batch that does not divide the device count is padded,
then trimmed. ``guidance_scale`` and ``eta`` are traced, so changing them never recompiles;
steps, sampler, image size and img2img start step are static.
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax.samplers import get_sampler, img2img_start


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Validated options shared by txt2img and img2img."""
    steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    sampler: str = "ddim"
    height: int = 512
    width: int = 512
    seed: int = 0

    def validate(self, downsample_factor: int) -> None:
        get_sampler(self.sampler)
        if not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}.")
        multiple = max(8, downsample_factor)
        for name in ("height", "width"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {v!r}; "
                                 f"try {max(multiple, round(v / multiple) * multiple) if isinstance(v, (int, float)) else 512}.")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}.")


def data_mesh() -> Mesh:
    """A 1-D mesh named ``data`` over every device of every host."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def pad_batch(x: np.ndarray, multiple: int) -> np.ndarray:
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)


# Independent random streams derived from one seed.
SAMPLER_STREAM, POSTERIOR_STREAM = 1 << 20, 1 << 21


@functools.partial(jax.jit, static_argnums=1)
def _standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # Module-level so that it compiles once per shape, not on every call of starting_noise.
    return jax.random.normal(key, shape, jnp.float32)


def starting_noise(seed: int, count: int, shape: tuple[int, ...], stream: int = 0) -> np.ndarray:
    """Standard-normal latents; image j's noise depends only on (seed, stream, j)."""
    root = jax.random.fold_in(jax.random.key(seed), stream) if stream else jax.random.key(seed)
    return np.stack([np.asarray(_standard_normal(jax.random.fold_in(root, j), tuple(shape))) for j in range(count)])


def to_uint8(images_BHWC: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded as the originals do."""
    return (np.clip(images_BHWC, 0.0, 1.0) * 255).round().astype(np.uint8)


def _generate(unet, vae, text_encoder, scaling_factor, sampler_name, start_index,
              params, cond_ids, uncond_ids, noise, key, plan, guidance_scale, init_images, posterior_noise):
    """The whole generation: ids -> context -> guided sampling -> f32 decode -> [0, 1] images."""
    sampler = get_sampler(sampler_name)
    ctx = text_encoder.apply({"params": params["text_encoder"]}, jnp.concatenate([uncond_ids, cond_ids]))
    dtype = unet.dtype

    def model_fn(x, t_B):
        x2 = jnp.concatenate([x, x]).astype(dtype)
        t2 = jnp.concatenate([t_B, t_B])
        out = unet.apply({"params": params["unet"]}, x2, t2, ctx.astype(dtype)).astype(jnp.float32)
        out_uncond, out_cond = jnp.split(out, 2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    x0 = None
    if init_images is not None:
        post = vae.apply({"params": params["vae"]}, init_images, method="encode")
        x0 = (post.mean + post.std * posterior_noise) * scaling_factor
    latents = sampler.sample(model_fn, noise, key, plan, start_index=start_index, x0=x0)
    images = vae.apply({"params": params["vae"]}, latents / scaling_factor, method="decode")
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


class Generator:
    """Compiled generation for one model; one compilation per (batch, size, steps, sampler, start)."""

    def __init__(self, unet, vae_f32, text_encoder, scaling_factor: float, scheduler_config, mesh: Mesh | None = None):
        self.mesh = mesh or data_mesh()
        self.scheduler_config = scheduler_config
        self._modules = (unet, vae_f32, text_encoder, float(scaling_factor))
        self._compiled: dict[tuple, Callable] = {}
        self.compile_seconds: float | None = None

    def _fn(self, sampler: str, start_index: int, with_init: bool) -> Callable:
        key = (sampler, start_index, with_init)
        if key not in self._compiled:
            batch = NamedSharding(self.mesh, P("data"))
            rep = NamedSharding(self.mesh, P())
            fn = functools.partial(_generate, *self._modules, sampler, start_index)
            self._compiled[key] = jax.jit(
                fn, in_shardings=(rep, batch, batch, batch, rep, rep, rep) + ((batch, batch) if with_init else (None, None)),
                out_shardings=batch)
        return self._compiled[key]

    def __call__(self, params, cond_ids: np.ndarray, uncond_ids: np.ndarray, noise: np.ndarray,
                 opts: SamplingOptions, init_images: np.ndarray | None = None, posterior_noise: np.ndarray | None = None,
                 strength: float = 1.0) -> np.ndarray:
        """[0, 1] float images (B, H, W, 3). Img2Img when ``init_images`` ([-1, 1]) is given: its latent
        posterior is sampled as mean + std * ``posterior_noise``, then noised to the start step."""
        sampler = get_sampler(opts.sampler)
        plan = sampler.make_plan(self.scheduler_config, opts.steps, eta=opts.eta)
        start = img2img_start(opts.steps, strength) if init_images is not None else 0
        n = cond_ids.shape[0]
        devices = self.mesh.devices.size
        args = [pad_batch(a, devices) for a in (cond_ids, uncond_ids, noise)]
        init = post = None
        if init_images is not None:
            init = pad_batch(np.asarray(init_images, np.float32), devices)
            post = pad_batch(np.asarray(posterior_noise, np.float32), devices)
        fn = self._fn(opts.sampler, start, init is not None)
        key = jax.random.fold_in(jax.random.key(opts.seed), SAMPLER_STREAM)
        out = fn(params, *args, key, plan, jnp.float32(opts.guidance_scale), init, post)
        return np.asarray(out)[:n]


def check_prompts(prompts: Sequence[str], negative_prompts: Sequence[str] | None) -> tuple[list[str], list[str]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (an empty string is fine).")
    if negative_prompts is None:
        negative = [""] * len(prompts)
    else:
        negative = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(negative) == 1:
            negative = negative * len(prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one, or one per prompt.")
    return prompts, negative


def check_init_images(images: Any, n: int, height: int, width: int) -> np.ndarray:
    """Init images as (B, H, W, 3) float32 in [-1, 1]; uint8 input is rescaled."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"init images must be (B, H, W, 3) or (H, W, 3), got shape {arr.shape}.")
    if arr.shape[1:3] != (height, width):
        raise ValueError(f"init images are {arr.shape[2]}x{arr.shape[1]} but height x width is {width}x{height}; "
                         "resize them or pass matching height/width.")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 127.5 - 1.0
    else:
        arr = arr.astype(np.float32)
        if arr.min() < -1.001 or arr.max() > 1.001:
            raise ValueError("float init images must be in [-1, 1] (or pass uint8 images in [0, 255]).")
    if arr.shape[0] == 1 and n > 1:
        arr = np.repeat(arr, n, axis=0)
    if arr.shape[0] != n:
        raise ValueError(f"{arr.shape[0]} init images for {n} prompts; give one, or one per prompt.")
    return arr
