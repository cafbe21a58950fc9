"""``sdjax-convert SRC DST --to diffusers|single_file|sdjax``: any checkpoint sdjax reads, written in any
format it writes (see ``sdjax.checkpoints.export``)."""

import argparse
import time
from typing import Sequence

from sdjax.cli import tune_gc
from sdjax.cli.errors import user_errors

DTYPES = ("float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdjax-convert",
        description="Convert a Stable Diffusion checkpoint (diffusers folder, original single file, sdjax export) "
                    "into a diffusers folder, an original-layout single .safetensors file, or an sdjax export.")
    p.add_argument("src", help="the checkpoint to read")
    p.add_argument("dst", help="where to write it (a folder; for --to single_file a .safetensors file)")
    p.add_argument("--to", required=True, choices=("diffusers", "single_file", "sdjax"), help="output format")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="write the weights in this precision "
                   "(default: as loaded, float32)")
    p.add_argument("--tokenizer", help="a tokenizer folder (vocab.json + merges.txt); single files carry none, "
                   "and a diffusers folder needs one")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="the model's prediction type, for single files (SD 2.x 768-v models: v_prediction)")
    p.add_argument("--allow-pickle", action="store_true", help="read .ckpt/.bin PyTorch pickles "
                   "(torch.load(weights_only=True))")
    p.add_argument("--variant", default=None, help="a diffusers folder's weights variant to read, e.g. fp16")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    tune_gc(argv)
    args = build_parser().parse_args(argv)
    with user_errors():
        import jax.numpy as jnp

        from sdjax.stable_diffusion import StableDiffusion

        start = time.time()
        sd = StableDiffusion.from_pretrained(args.src, tokenizer=args.tokenizer, prediction_type=args.prediction_type,
                                             allow_pickle=args.allow_pickle, variant=args.variant)
        print(f"read {args.src} ({time.time() - start:.1f} s); writing {args.to} to {args.dst}", flush=True)
        sd.save_pretrained(args.dst, format=args.to, dtype=getattr(jnp, args.dtype) if args.dtype else None)
        print(f"wrote {args.dst} ({time.time() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
