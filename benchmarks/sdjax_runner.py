"""sdjax's side of the Text2Img, compile-time and sampler-overhead benchmarks (run as a subprocess).

    python -m benchmarks.sdjax_runner --folder F --batch 1 --steps 4 --height 128 --width 128 --repeats 3
"""

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing

PROMPT = "a photo of an astronaut riding a horse on the moon"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def enable_compile_cache(path: str) -> None:
    """JAX's persistent compilation cache in ``path``, for every compilation however small."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def text2img_call(sd, batch: int, steps: int, height: int, width: int):
    prompts = [PROMPT] * batch
    return lambda: sd.txt2img(prompts, steps=steps, guidance_scale=7.5, sampler="ddim", height=height, width=width,
                              seed=0, output="float")


def text2img(sd, batch: int, steps: int, height: int, width: int, repeats: int) -> dict[str, Any]:
    """Cold first call (trace + compile + run), then the warm median; txt2img returns host arrays."""
    call = text2img_call(sd, batch, steps, height, width)
    first = timing.first_call(call, np.asarray)
    warm = timing.measure(call, np.asarray, repeats, warmup=1)
    return dict(first_call_s=first, batch_s=warm["median_s"], images_per_s=batch / warm["median_s"],
                times_s=warm["times_s"])


def components(sd, batch: int, steps: int, height: int, width: int, repeats: int) -> dict[str, Any]:
    """Each network alone, jitted, at the shapes Text2Img runs it: text encoder and UNet on the
    guided batch 2B, the VAE decoder on B; ``ideal_s`` = text + steps x UNet + decode."""
    f, c = sd.downsample_factor, sd.configs.unet.in_channels
    ids = sd.tokenize([PROMPT] * batch + [""] * batch)
    ctx = sd.encode_ids(ids)
    latents = jax.random.normal(jax.random.key(0), (2 * batch, height // f, width // f, c), jnp.float32)
    t = jnp.int32(500)
    sync = jax.block_until_ready
    text = timing.measure(lambda: sd.encode_ids(ids), sync, repeats, warmup=2)["median_s"]
    unet = timing.measure(lambda: sd.unet_apply(latents, t, ctx), sync, repeats, warmup=2)["median_s"]
    vae = timing.measure(lambda: sd.vae_decode(latents[:batch]), sync, repeats, warmup=2)["median_s"]
    return dict(text_encoder_s=text, unet_guided_s=unet, vae_decode_s=vae, ideal_s=text + steps * unet + vae)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--compile-cache", default=None, help="persistent compilation cache folder")
    p.add_argument("--first-call-only", action="store_true", help="only the cold first call (compile benchmark)")
    p.add_argument("--overhead", action="store_true", help="also time each network alone")
    a = p.parse_args(argv)
    if a.compile_cache:
        enable_compile_cache(a.compile_cache)
    from sdjax import StableDiffusion

    t0 = time.perf_counter()
    sd = StableDiffusion.from_pretrained(a.folder, dtype=DTYPES[a.dtype])
    jax.block_until_ready(sd.params)
    out = dict(load_s=time.perf_counter() - t0, device=jax.devices()[0].device_kind, devices=jax.device_count(),
               versions=timing.versions("jax", "jaxlib", "flax", "diffusers", "torch", "transformers"))
    if a.first_call_only:
        out["first_call_s"] = timing.first_call(text2img_call(sd, a.batch, a.steps, a.height, a.width), np.asarray)
    else:
        out.update(text2img(sd, a.batch, a.steps, a.height, a.width, a.repeats))
        if a.overhead:
            out.update(components(sd, a.batch, a.steps, a.height, a.width, a.repeats))
            out["overhead"] = out["batch_s"] / out["ideal_s"]
    timing.emit(out)


if __name__ == "__main__":
    main()
