"""diffusers' FlaxStableDiffusionPipeline (0.39.0, the last release with Flax classes), run in its own venv.

Loads the same diffusers folder as sdjax (PyTorch safetensors, converted with ``from_pt=True``),
FlaxDDIMScheduler, the documented ``jit=True`` path (pmap over the local devices).
Standard library + the peer's packages only: it must not import sdjax.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing

PROMPT = "a photo of an astronaut riding a horse on the moon"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def load(folder: str, dtype):
    import diffusers.models.modeling_flax_utils as flax_utils
    from diffusers import FlaxDDIMScheduler, FlaxStableDiffusionPipeline

    # from_pt looks only for the .bin name; diffusers' load_state_dict reads safetensors by extension.
    flax_utils.WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
    # The folder's DDIMScheduler loads as FlaxDDIMScheduler (its state lands in params["scheduler"]).
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(folder, from_pt=True, dtype=dtype, safety_checker=None,
                                                               feature_extractor=None)
    if not isinstance(pipe.scheduler, FlaxDDIMScheduler):
        raise TypeError(f"expected FlaxDDIMScheduler, the folder gave {type(pipe.scheduler).__name__}")
    if dtype != jnp.float32:
        params = {k: (jax.tree.map(lambda x: x.astype(dtype), v) if k in ("unet", "text_encoder") else v)
                  for k, v in params.items()}
    return pipe, params


def main(argv=None) -> None:
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    a = p.parse_args(argv)
    n_dev = jax.local_device_count()
    if a.batch % n_dev:
        raise SystemExit(f"batch {a.batch} must be a multiple of the {n_dev} local devices for the pmap pipeline.")
    t0 = time.perf_counter()
    pipe, params = load(a.folder, DTYPES[a.dtype])
    params = replicate(params)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    ids = shard(pipe.prepare_inputs([PROMPT] * a.batch))
    rng = jax.random.split(jax.random.PRNGKey(0), n_dev)

    def call():
        return pipe(ids, params, rng, num_inference_steps=a.steps, height=a.height, width=a.width,
                    guidance_scale=7.5, jit=True).images

    first = timing.first_call(call, np.asarray)
    warm = timing.measure(call, np.asarray, a.repeats, warmup=1)
    timing.emit(dict(load_s=load_s, first_call_s=first, batch_s=warm["median_s"],
                     images_per_s=a.batch / warm["median_s"],
                     times_s=warm["times_s"], device=jax.devices()[0].device_kind, devices=n_dev,
                     versions=timing.versions("jax", "jaxlib", "flax", "diffusers", "torch", "transformers")))


if __name__ == "__main__":
    main()
