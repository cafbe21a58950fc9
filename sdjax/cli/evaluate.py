"""``sdjax-eval``: FID as pytorch-fid computes it and CLIP score as MLPerf does, in JAX. Each command
prints its figure on its last line.

    sdjax-eval stats IMAGES_DIR OUT.npz --inception pt_inception-2015-12-05-6726825d.pth --allow-pickle
    sdjax-eval fid A B [--inception FILE]     # A, B: image folders or statistics .npz files
    sdjax-eval clip IMAGES_DIR --clip open_clip_pytorch_model.bin --allow-pickle --tokenizer bpe_simple_vocab_16e6.txt.gz

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
    q = sub.add_parser("clip", help="the CLIP score of a captioned image folder (metadata.jsonl), as MLPerf")
    q.add_argument("images", help="a folder of images with metadata.jsonl ({\"file_name\": ..., \"text\": ...} "
                   "per line, the training folders' format)")
    q.add_argument("--clip", required=True, help="open_clip weights (open_clip_pytorch_model.bin, or .safetensors)")
    q.add_argument("--clip-config", help="open_clip's model config JSON (default: ViT-H-14, MLPerf's)")
    q.add_argument("--tokenizer", required=True, help="open_clip's bpe_simple_vocab_16e6.txt.gz, or a CLIP tokenizer "
                   "folder with the same vocabulary (vocab.json + merges.txt, e.g. SD 2's tokenizer/)")
    q.add_argument("--torchmetrics", action="store_true", help="report torchmetrics' 100 * max(mean, 0) instead of "
                   "MLPerf's mean cosine")
    q.add_argument("--allow-pickle", action="store_true",
                   help="read a .bin/.pt PyTorch pickle (torch.load(weights_only=True))")
    q.add_argument("--batch-size", type=int, default=50, help="images per batch over the local devices")
    return p


def _captioned(folder: str) -> list[tuple[str, str]]:
    """(file name, caption) of each line of ``folder/metadata.jsonl``; a malformed line is an error naming it."""
    import json

    from sdjax.data.image_folder import METADATA_FILE

    meta = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"{meta}: no such file. The CLIP score pairs each image with its caption: put a "
                                f'{METADATA_FILE} with lines {{"file_name": ..., "text": ...}} in the folder.')
    entries = []
    with open(meta, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries.append((str(entry["file_name"]), str(entry["text"])))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f'{meta}, line {number}: expected {{"file_name": ..., "text": ...}}, got '
                                 f"{line.strip()[:200]!r}.") from None
    if not entries:
        raise ValueError(f"{meta} lists no images.")
    return entries


def _clip(args: argparse.Namespace) -> None:
    import json

    import numpy as np

    from sdjax.checkpoints.open_clip import load_clip
    from sdjax.evaluation import clip_score
    from sdjax.evaluation.features import Skipped, read_image
    from sdjax.models.clip import CLIPConfig
    from sdjax.tokenizer import load_tokenizer, tokenize

    entries = _captioned(args.images)
    if args.clip_config:
        with open(args.clip_config, encoding="utf-8") as f:
            config = CLIPConfig.from_open_clip(json.load(f))
    else:
        config = CLIPConfig()
    tokenizer = load_tokenizer(args.tokenizer)
    scorer = clip_score.CLIPScorer(load_clip(args.clip, config, allow_pickle=args.allow_pickle), config,
                                   batch_size=args.batch_size)
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
        if args.command == "clip":
            _clip(args)
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
