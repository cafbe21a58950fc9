"""``sdjax-eval``: FID as pytorch-fid computes it and CLIP score as MLPerf does, in JAX. Each command
prints its figure on its last line.

    sdjax-eval stats IMAGES_DIR OUT.npz --inception pt_inception-2015-12-05-6726825d.pth --allow-pickle
    sdjax-eval fid A B [--inception FILE]     # A, B: image folders or statistics .npz files
    sdjax-eval clip IMAGES_DIR --clip open_clip_pytorch_model.bin --allow-pickle \
        --tokenizer bpe_simple_vocab_16e6.txt.gz
    sdjax-eval generate --checkpoint CKPT --captions val2014_30k.tsv --ref-stats val2014_30k_stats.npz \
        --inception pt_inception-2015-12-05-6726825d.pth --clip open_clip_pytorch_model.bin \
        --clip-tokenizer bpe_simple_vocab_16e6.txt.gz --allow-pickle   # MLPerf's protocol: FID and CLIP score

The Inception weights are pytorch-fid's file (a PyTorch pickle: read with ``--allow-pickle``, as
``torch.load(weights_only=True)``) or its conversion to .safetensors; nothing is downloaded.
"""

import argparse
import os
import time
from typing import Sequence

from sdjax.cli import tune_gc
from sdjax.cli.errors import user_errors
from sdjax.evaluation.evaluator import Protocol

CLIP_TOKENIZER_HELP = ("open_clip's bpe_simple_vocab_16e6.txt.gz, or a CLIP tokenizer folder with the same "
                       "vocabulary (vocab.json + merges.txt, e.g. SD 2's tokenizer/)")
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
    q = sub.add_parser("clip", help="the CLIP score of a captioned image folder (metadata.jsonl), as MLPerf")
    q.add_argument("images", help="a folder of images with metadata.jsonl ({\"file_name\": ..., \"text\": ...} "
                   "per line, the training folders' format)")
    q.add_argument("--clip", required=True, help="open_clip weights (open_clip_pytorch_model.bin, or .safetensors)")
    q.add_argument("--clip-config", help="open_clip's model config JSON (default: ViT-H-14, MLPerf's)")
    q.add_argument("--tokenizer", "--clip-tokenizer", dest="clip_tokenizer", required=True, help=CLIP_TOKENIZER_HELP)
    q.add_argument("--torchmetrics", action="store_true", help="report torchmetrics' 100 * max(mean, 0) instead of "
                   "MLPerf's mean cosine")
    q.add_argument("--allow-pickle", action="store_true",
                   help="read a .bin/.pt PyTorch pickle (torch.load(weights_only=True))")
    q.add_argument("--batch-size", type=int, default=50, help="images per batch over the local devices")

    q = sub.add_parser("generate", help="FID and CLIP score of a model's images for a caption list, as MLPerf "
                       "draws them (DDIM, 50 steps, eta 0, guidance 8, 512 px), over every device and host")
    q.add_argument("--checkpoint", required=True, help="the model: a diffusers folder, a single file or an sdjax "
                   "export (as sdjax-txt2img reads)")
    q.add_argument("--tokenizer", help="the model's tokenizer folder, for a single file (it carries none)")
    q.add_argument("--captions", required=True, help="MLPerf's val2014_30k.tsv (tab-separated, a header naming "
                   "'caption' and 'id'), or a captioned image folder's metadata.jsonl")
    q.add_argument("--limit", type=int, help="the first N captions only (a quick look; MLPerf uses all 30,000)")
    q.add_argument("--ref-stats", help="the reference FID statistics .npz (MLPerf's val2014_30k_stats.npz); "
                   "with --inception, FID is reported")
    q.add_argument("--inception", help=INCEPTION_HELP)
    q.add_argument("--clip", help="open_clip weights; with --clip-tokenizer, the CLIP score is reported")
    q.add_argument("--clip-config", help="open_clip's model config JSON (default: ViT-H-14, MLPerf's)")
    q.add_argument("--clip-tokenizer", help=CLIP_TOKENIZER_HELP)
    q.add_argument("--allow-pickle", action="store_true",
                   help="read PyTorch pickles (.pth/.bin/.ckpt) with torch.load(weights_only=True)")
    defaults = Protocol()
    q.add_argument("--sampler", default=defaults.sampler)
    q.add_argument("--steps", type=int, default=defaults.steps)
    q.add_argument("--eta", type=float, default=defaults.eta)
    q.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale)
    q.add_argument("--size", type=int, default=defaults.size, help="image side in pixels (MLPerf: 512)")
    q.add_argument("--negative-prompt", default=defaults.negative_prompt)
    q.add_argument("--seed", type=int, default=defaults.seed)
    q.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="images per compiled call over all devices of all hosts")
    q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the UNet's and text encoder's compute dtype (the autoencoder stays in float32)")
    q.add_argument("--images", help="also write each image here as ID.png (and a metadata.jsonl), to look at or "
                   "to score again with the other commands")
    q.add_argument("--save-stats", help="also write the images' FID statistics to this .npz (never overwritten)")
    return p


def _clip(args: argparse.Namespace) -> None:
    import numpy as np

    from sdjax.evaluation import captions, clip_score
    from sdjax.evaluation.evaluator import Judges
    from sdjax.evaluation.features import Skipped, read_image
    from sdjax.tokenizer import tokenize

    entries = [(c.name, c.text) for c in captions.from_metadata(args.images)]
    judges = Judges.load(clip=args.clip, clip_config=args.clip_config, clip_tokenizer=args.clip_tokenizer,
                         allow_pickle=args.allow_pickle)
    config, tokenizer = judges.clip_config, judges.clip_tokenizer
    scorer = clip_score.CLIPScorer(judges.clip, config, batch_size=args.batch_size)
    cosines, skipped = [], Skipped()
    for start in range(0, len(entries), scorer.batch_size):
        batch = [(text, read_image(os.path.join(args.images, name)))
                 for name, text in entries[start:start + scorer.batch_size]]
        skipped.files += [name for (name, _), (_, image) in zip(entries[start:], batch) if image is None]
        batch = [(text, image) for text, image in batch if image is not None]
        if batch:
            ids = tokenize(tokenizer, [text for text, _ in batch], config.text.max_position_embeddings)
            cosines.append(scorer.cosines([image for _, image in batch], ids))
        print(f"clip score: {min(start + scorer.batch_size, len(entries))}/{len(entries)} images", flush=True)
    skipped.report(args.images)
    if not cosines:
        raise ValueError(f"{args.images}: none of its {len(entries)} images decode.")
    print(f"CLIP score: {clip_score.score(np.concatenate(cosines), torchmetrics=args.torchmetrics)}", flush=True)


def _generate(args: argparse.Namespace) -> None:
    import json

    import jax
    import jax.numpy as jnp
    from etils import epath

    from sdjax import sharding
    from sdjax.evaluation import captions as captions_lib
    from sdjax.evaluation.evaluator import Evaluator, Judges
    from sdjax.stable_diffusion import StableDiffusion

    sharding.initialize_distributed()
    if args.ref_stats and not args.inception or args.inception and not args.ref_stats:
        raise ValueError("FID needs both --ref-stats (the reference statistics .npz) and --inception "
                         f"({INCEPTION_HELP}).")
    if args.clip and not args.clip_tokenizer or args.clip_tokenizer and not args.clip:
        raise ValueError("the CLIP score needs both --clip (open_clip weights) and --clip-tokenizer "
                         f"({CLIP_TOKENIZER_HELP}).")
    if not args.ref_stats and not args.clip:
        raise ValueError("nothing to measure: give --ref-stats with --inception (FID), --clip with --clip-tokenizer "
                         "(CLIP score), or both.")
    if args.save_stats and not args.inception:
        raise ValueError("--save-stats writes the images' Inception statistics: give --inception and --ref-stats.")
    if args.save_stats and (os.path.exists(args.save_stats) or not args.save_stats.endswith(".npz")):
        raise ValueError(f"--save-stats={args.save_stats}: give a new file name ending in .npz (statistics are never "
                         "overwritten).")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit={args.limit}: give a positive number of captions.")
    captions = captions_lib.read(args.captions)[:args.limit]
    # Every weight file is read before the first compile, so a wrong path fails in seconds.
    judges = Judges.load(inception=args.inception, ref_stats=args.ref_stats, clip=args.clip,
                         clip_config=args.clip_config, clip_tokenizer=args.clip_tokenizer,
                         allow_pickle=args.allow_pickle)
    sd = StableDiffusion.from_pretrained(args.checkpoint, dtype=getattr(jnp, args.dtype), tokenizer=args.tokenizer,
                                         allow_pickle=args.allow_pickle)
    protocol = Protocol(sampler=args.sampler, steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale,
                        size=args.size, negative_prompt=args.negative_prompt, seed=args.seed,
                        batch_size=args.batch_size)
    evaluator = Evaluator.of(sd, protocol, judges)
    if jax.process_index() == 0:
        print(f"{len(captions)} captions, {protocol.steps} {protocol.sampler} steps, "
              f"guidance {protocol.guidance_scale}, "
              f"{evaluator.latent_shape[0] * sd.downsample_factor} px, batches of {evaluator.batch_size} on "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s)", flush=True)
    result = evaluator(evaluator.replicated(sd.params), captions, sd.scaling_factor, images_dir=args.images)
    if jax.process_index() == 0:
        if args.images:
            (epath.Path(args.images) / "metadata.jsonl").write_text(
                "".join(json.dumps({"file_name": f"{c.name}.png", "text": c.text}) + "\n" for c in captions))
        if args.save_stats:
            result.statistics.save(args.save_stats)
        print(f"measured {result.images} images", flush=True)
        if result.fid is not None:
            print(f"FID: {result.fid}", flush=True)
        if result.clip_score is not None:
            print(f"CLIP score: {result.clip_score}", flush=True)


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
    tune_gc(argv)
    args = build_parser().parse_args(argv)
    with user_errors():
        if args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size}: give a positive number of images.")
        from sdjax.evaluation import fid

        extractor: list = []  # the Inception network, built on first need
        if args.command == "clip":
            _clip(args)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "stats":
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
