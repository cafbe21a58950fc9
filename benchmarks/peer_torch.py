"""diffusers' PyTorch StableDiffusionPipeline (current release), run in its own venv.

Same diffusers folder, its DDIMScheduler, same steps and guidance; f32 on CPU, fp16 on CUDA.
Standard library + the peer's packages only: it must not import sdjax.
"""

import argparse
import time

import numpy as np
import torch

from benchmarks import timing

PROMPT = "a photo of an astronaut riding a horse on the moon"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv=None) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(a.folder, torch_dtype=DTYPES[a.dtype], safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise TypeError(f"expected DDIMScheduler, the folder gave {type(pipe.scheduler).__name__}")
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    generator = torch.Generator(device).manual_seed(0)

    @torch.inference_mode()
    def call():
        return pipe([PROMPT] * a.batch, num_inference_steps=a.steps, guidance_scale=7.5, height=a.height,
                    width=a.width, generator=generator, output_type="np").images

    first = timing.first_call(call, np.asarray)  # output_type="np" copies to the host: synchronised
    warm = timing.measure(call, np.asarray, a.repeats, warmup=1)
    timing.emit(dict(load_s=load_s, first_call_s=first, batch_s=warm["median_s"],
                     images_per_s=a.batch / warm["median_s"],
                     times_s=warm["times_s"], device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     threads=torch.get_num_threads(),
                     versions=timing.versions("torch", "diffusers", "transformers", "jax", "flax")))


if __name__ == "__main__":
    main()
