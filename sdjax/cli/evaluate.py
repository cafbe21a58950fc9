"""``sdjax-eval``: FID as pytorch-fid computes it, in JAX. Each command prints its figure on its last line.

    sdjax-eval stats IMAGES_DIR OUT.npz --inception pt_inception-2015-12-05-6726825d.pth --allow-pickle
    sdjax-eval fid A B [--inception FILE]     # A, B: image folders or statistics .npz files

The Inception weights are pytorch-fid's file (a PyTorch pickle: read with ``--allow-pickle``, as
``torch.load(weights_only=True)``) or its conversion to .safetensors; nothing is downloaded.
"""

import argparse
import os
import time
from typing import Sequence

from sdjax.cli.errors import user_errors

INCEPTION_HELP = ("pytorch-fid's Inception weights: pt_inception-2015-12-05-6726825d.pth (from the pytorch-fid "
                  "GitHub release 'fid_weights') or a .safetensors conversion of it")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdjax-eval", description="Evaluate images: FID statistics and distances.")
    sub = p.add_subparsers(dest="command", required=True)

    def weights(q: argparse.ArgumentParser, required: bool) -> None:
        q.add_argument("--inception", required=required, help=INCEPTION_HELP)
        q.add_argument("--allow-pickle", action="store_true",
                       help="read a .pth/.bin PyTorch pickle (torch.load(weights_only=True))")
        q.add_argument("--batch-size", type=int, default=50, help="images per batch over the local devices")

    q = sub.add_parser("stats", help="Inception statistics of an image folder, as pytorch-fid --save-stats")
    q.add_argument("images", help="a folder of images")
    q.add_argument("out", help="the statistics file to write (.npz with mu and sigma)")
    weights(q, required=True)
    q = sub.add_parser("fid", help="the FID between two image folders or statistics files")
    q.add_argument("a", help="an image folder or a statistics .npz")
    q.add_argument("b", help="an image folder or a statistics .npz")
    weights(q, required=False)
    return p


def _statistics(path: str, args: argparse.Namespace, extractor: list):
    from sdjax.evaluation import fid

    if path.endswith(".npz"):
        return fid.Statistics.load(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: neither a folder of images nor a statistics .npz file.")
    if not extractor:
        if not args.inception:
            raise ValueError(f"{path} is an image folder: its features need the Inception weights, --inception FILE "
                             f"({INCEPTION_HELP}).")
        from sdjax.checkpoints.load import load_inception
        from sdjax.evaluation.features import InceptionFeatures

        extractor.append(InceptionFeatures(load_inception(args.inception, allow_pickle=args.allow_pickle),
                                           batch_size=args.batch_size))
    start = time.time()
    features, skipped = extractor[0].of_folder(path)
    print(f"{path}: {len(features)} images ({time.time() - start:.1f} s)", flush=True)
    return fid.Statistics.of(features)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with user_errors():
        if args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size}: give a positive number of images.")
        from sdjax.evaluation import fid

        extractor: list = []  # the Inception network, built on first need
        if args.command == "stats":
            if os.path.exists(args.out):
                raise FileExistsError(f"{args.out} exists; give a new file name (statistics are never overwritten).")
            if not args.out.endswith(".npz"):
                raise ValueError(f"{args.out}: statistics files end in .npz (pytorch-fid's format).")
            stats = _statistics(args.images, args, extractor)
            stats.save(args.out)
            print(f"wrote {args.out}: statistics of {args.images}", flush=True)
        else:
            a, b = (_statistics(p, args, extractor) for p in (args.a, args.b))
            print(f"FID: {fid.frechet_distance(a, b)}", flush=True)


if __name__ == "__main__":
    main()
