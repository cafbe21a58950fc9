"""Text2Img, Img2Img and inpainting from the command line (``sdjax-txt2img``, ``sdjax-img2img``,
``sdjax-inpaint``).

Writes one PNG per image with a JSON sidecar (enough to reproduce it) as each batch finishes,
so memory stays flat however many prompts there are, and one grid per run of at most
``GRID_MAX_IMAGES`` thumbnails, at most ``GRID_MAX_SIDE`` pixels a side (``--skip-grid``: none).
The CompVis script spellings (``--ckpt``, ``--ddim_steps``, ``--n_samples``, ``--n_iter``,
``--outdir``, ``--fixed_code``, ``--precision``, ``--ddim_eta``) are accepted too.
"""

import argparse
import io
import json
import math
import os
import re
import time
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image

from sdjax import images as images_lib, paths
from sdjax.checkpoints import hub
from sdjax.cli import tune_gc
from sdjax.cli.errors import user_errors
from sdjax.samplers import SAMPLERS

DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = {"full": "float32", "autocast": "bfloat16"}  # CompVis' --precision
GRID_MAX_IMAGES = 64
GRID_MAX_SIDE = 4096


MODES = {"txt2img": "Text2Img", "img2img": "Img2Img", "inpaint": "Inpainting"}
# Options recorded in the sidecar when given: SDXL's micro-conditioning, then the text and guidance tweaks.
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score")
TWEAKS = ("clip_skip", "guidance_rescale")


def size_arg(value: str) -> tuple[int, int]:
    """``H,W`` (or ``HxW``) as two integers."""
    parts = re.split(r"[,x]", value.strip())
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{value!r}: give two integers, e.g. 1024,1024")
    return int(parts[0]), int(parts[1])


def build_parser(mode: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"sdjax-{mode}",
        description=f"{MODES[mode]} with a Stable Diffusion checkpoint "
                    "(diffusers folder, single .safetensors file, or sdjax export).")
    p.add_argument("--checkpoint", "--ckpt", required=True, help="checkpoint path")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt (may be empty: \"\")")
    src.add_argument("--from-file", "--from_file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None,
                   help="replaces the empty unconditional prompt (SDXL base without one: a zero negative conditioning)")
    p.add_argument("--n-samples", "--n_samples", type=int, default=4, help="images per prompt in one batch")
    p.add_argument("--n-iter", "--n_iter", type=int, default=1, help="batches per prompt")
    p.add_argument("--steps", "--ddim_steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--eta", "--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0, help="batch b uses seed + b (with --fixed-code: seed)")
    p.add_argument("--fixed-code", "--fixed_code", action="store_true",
                   help="the same starting noise for every batch (CompVis' --fixed_code)")
    p.add_argument("--H", type=int, default=None, help="height in pixels (default: the model's native size; "
                                                       "img2img: the init image's, keeping its aspect ratio)")
    p.add_argument("--W", type=int, default=None, help="width in pixels (defaults as --H)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="compute dtype (params stay float32); default float32")
    p.add_argument("--precision", default=None, choices=sorted(PRECISIONS),
                   help="CompVis spelling: full = --dtype float32, autocast = --dtype bfloat16")
    p.add_argument("--out", "--outdir", default="outputs", help="output folder (existing files are never overwritten)")
    p.add_argument("--skip-grid", "--skip_grid", action="store_true", help="write no grid image")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (single-file checkpoints carry none)")
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="override (single files cannot tell; SD 2.x 768-v models are v_prediction)")
    p.add_argument("--allow-pickle", action="store_true", help="allow PyTorch pickles (.ckpt/.bin)")
    p.add_argument("--variant", default=None, help="a diffusers folder's weights variant, e.g. fp16 "
                   "(reads *.fp16.safetensors; the parameters are float32 in memory)")
    p.add_argument("--compile-cache", default=None, help="folder for JAX's persistent compilation cache")
    sdxl = p.add_argument_group("SDXL micro-conditioning (diffusers' arguments of the same names)")
    sdxl.add_argument("--original-size", type=size_arg, default=None, metavar="H,W",
                      help="the size the model is told the image had (default: the output size)")
    sdxl.add_argument("--crops-coords-top-left", type=size_arg, default=None, metavar="TOP,LEFT",
                      help="the crop offset the model is told of (default 0,0)")
    sdxl.add_argument("--target-size", type=size_arg, default=None, metavar="H,W", help="default: the output size")
    sdxl.add_argument("--aesthetic-score", type=float, default=None, help="the refiner's (default 6.0)")
    if mode == "txt2img":
        sdxl.add_argument("--refiner", default=None, metavar="CKPT",
                          help="an SDXL refiner that finishes the base's denoising (diffusers' ensemble of experts)")
        sdxl.add_argument("--high-noise-frac", type=float, default=0.8,
                          help="with --refiner: the fraction of the noise schedule the base runs (default 0.8)")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="take the prompt's text context that many encoder layers early (diffusers' clip_skip)")
    p.add_argument("--guidance-rescale", type=float, default=None,
                   help="in [0, 1]: rescale the guided prediction to the conditional one's spread (diffusers')")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA (.safetensors: diffusers/PEFT or kohya layout) at SCALE (default 1); repeatable")
    if mode != "txt2img":
        p.add_argument("--init-img", "--init_img", required=True,
                       help="the starting image (scaled and centre-cropped to H x W, never squashed)")
        p.add_argument("--strength", type=float, default=0.75 if mode == "img2img" else 1.0,
                       help="in (0, 1]: how much to change the image" + (" (1: repaint from pure noise)"
                                                                         if mode == "inpaint" else ""))
    if mode == "inpaint":
        p.add_argument("--mask", required=True, help="the mask: an image of the init image's size, white = repaint, "
                                                     "black = keep (binarised at half grey)")
    return p


def check_args(args: argparse.Namespace, mode: str) -> list[str]:
    """Validate everything that needs no model; return the prompts."""
    if args.from_file is not None:
        if not os.path.isfile(args.from_file):
            raise SystemExit(f"error: --from-file {args.from_file}: no such file.")
        with open(args.from_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise SystemExit(f"error: --from-file {args.from_file} has no prompts (one per line).")
    else:
        prompts = [args.prompt]
    if not hub.is_hub_id(args.checkpoint) and not paths.exists(paths.check(args.checkpoint, "--checkpoint")):
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file or directory.")
    for name in ("H", "W"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise SystemExit(f"error: --{name} must be a positive multiple of 8, got {v}.")
    if args.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1, got {args.steps}.")
    args.lora = [lora_arg(a) for a in args.lora]
    if args.n_samples < 1 or args.n_iter < 1:
        raise SystemExit("error: --n-samples and --n-iter must be >= 1.")
    if args.precision is not None:
        if args.dtype is not None and args.dtype != PRECISIONS[args.precision]:
            raise SystemExit(f"error: --precision {args.precision} means --dtype {PRECISIONS[args.precision]}, "
                             f"but --dtype {args.dtype} was given; pass one of them.")
        args.dtype = PRECISIONS[args.precision]
    args.dtype = args.dtype or "float32"
    refiner = getattr(args, "refiner", None)
    if refiner is not None:
        if not hub.is_hub_id(refiner) and not paths.exists(paths.check(refiner, "--refiner")):
            raise SystemExit(f"error: --refiner {refiner}: no such file or directory.")
        if not 0.0 < args.high_noise_frac < 1.0:
            raise SystemExit(f"error: --high-noise-frac must be in (0, 1), got {args.high_noise_frac}.")
    if mode != "txt2img":
        for flag, path in (("--init-img", args.init_img), ("--mask", getattr(args, "mask", None))):
            if path is not None and not os.path.isfile(path):
                raise SystemExit(f"error: {flag} {path}: no such file.")
        if not 0.0 < args.strength <= 1.0:
            raise SystemExit(f"error: --strength must be in (0, 1], got {args.strength}.")
    return prompts


def _where(path: str) -> str:
    """A path as a sidecar records it: absolute, or the gs:// URL or hub id as given."""
    return path if paths.is_remote(path) or hub.is_hub_id(path) else os.path.abspath(path)


def _open(path: str, flag: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except OSError as e:
        raise SystemExit(f"error: {flag} {path}: not an image PIL can read ({e}).") from None
    return img


def lora_arg(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a path that itself holds a colon needs the scale spelled out."""
    path, scale = value, 1.0
    if ":" in value:
        head, tail = value.rsplit(":", 1)
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = value
    if not hub.is_hub_id(path) and not paths.exists(paths.check(path, "--lora")):
        raise SystemExit(f"error: --lora {path}: no such file.")
    return path, scale


def init_image(path: str, height: int | None, width: int | None, multiple: int = 8) -> np.ndarray:
    """The init image as uint8 (H, W, 3). Without --H/--W its own size rounded down to a multiple
    of ``multiple``; with one of them, the other follows its aspect ratio. It is scaled to cover
    H x W and centre-cropped, so it is never squashed."""
    return _fit(_open(path, "--init-img").convert("RGB"), height, width, multiple)


def init_mask(path: str, init_path: str, height: int | None, width: int | None, multiple: int = 8) -> np.ndarray:
    """The mask as uint8 (H, W), scaled and cropped exactly as the init image at ``init_path`` is."""
    mask, init = _open(path, "--mask"), _open(init_path, "--init-img")
    if mask.size != init.size:
        raise SystemExit(f"error: --mask {path} is {mask.size[0]}x{mask.size[1]} but --init-img {init_path} is "
                         f"{init.size[0]}x{init.size[1]}; give a mask of the image's size.")
    return _fit(mask.convert("L"), height, width, multiple)


def _fit(img: Image.Image, height: int | None, width: int | None, multiple: int) -> np.ndarray:
    w, h = img.size
    if width is None and height is None:
        width, height = w, h
    elif width is None:
        width = w * height / h
    elif height is None:
        height = h * width / w
    width, height = (max(multiple, int(v) // multiple * multiple) for v in (width, height))
    scale = max(width / w, height / h)
    size = (max(width, math.ceil(w * scale)), max(height, math.ceil(h * scale)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


def safe_name(prompt: str, limit: int = 60) -> str:
    """A file-name fragment from a prompt: no path separators or odd characters, bounded length."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", prompt).strip("_-")[:limit]
    return name or "empty"


class OutputWriter:
    """Numbered PNGs with JSON sidecars in a local or ``gs://`` folder; picks indices past what is
    already there."""

    def __init__(self, folder: str):
        self.folder = epath.Path(paths.check(folder, "--out"))
        self.folder.mkdir(parents=True, exist_ok=True)
        names = [p.name for p in self.folder.iterdir()] if self.folder.exists() else []
        taken = [int(m.group(1)) for f in names if (m := re.match(r"(\d{5})-", f))]
        self.next = max(taken, default=-1) + 1
        grids = [int(m.group(1)) for f in names if (m := re.match(r"grid-(\d{4})\.png$", f))]
        self.grid_index = max(grids, default=-1) + 1

    def _free(self, stem: str) -> epath.Path:
        path = self.folder / stem
        if path.with_suffix(".png").exists() or path.with_suffix(".json").exists():
            raise FileExistsError(f"{path}.png exists; refusing to overwrite.")
        return path

    @staticmethod
    def _png(path: epath.Path, image: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        path.with_suffix(".png").write_bytes(buf.getvalue())
        return os.fspath(path) + ".png"

    def write(self, image: np.ndarray, meta: dict) -> str:
        path = self._free(f"{self.next:05d}-{safe_name(meta['prompt'])}")
        self.next += 1
        out = self._png(path, image)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return out

    def write_grid(self, grid: np.ndarray) -> str:
        return self._png(self._free(f"grid-{self.grid_index:04d}"), grid)


class Grid:
    """The first ``max_images`` images of a run, as thumbnails small enough that the grid of ``cols``
    columns stays within ``max_side`` pixels a side."""

    def __init__(self, cols: int, height: int, width: int, max_images: int = GRID_MAX_IMAGES,
                 max_side: int = GRID_MAX_SIDE):
        self.cols = max(1, min(cols, max_images))
        rows = math.ceil(max_images / self.cols)
        scale = min(1.0, max_side / (self.cols * width), max_side / (rows * height))
        self.cell = (max(1, int(width * scale)), max(1, int(height * scale)))
        self.max_images = max_images
        self.images: list[np.ndarray] = []

    def add(self, image: np.ndarray) -> None:
        if len(self.images) < self.max_images:
            thumb = Image.fromarray(image)
            if thumb.size != self.cell:
                thumb = thumb.resize(self.cell, Image.Resampling.LANCZOS)
            self.images.append(np.asarray(thumb))

    def render(self) -> np.ndarray:
        return images_lib.grid(self.images, self.cols)


def _progress(done: int, total: int, start: float) -> None:
    elapsed = time.perf_counter() - start
    eta = elapsed / done * (total - done) if done else 0.0
    bar = "#" * int(30 * done / total)
    print(f"\r[{bar:<30}] {done}/{total} batches  {elapsed:6.1f}s elapsed  {eta:6.1f}s left", end="", flush=True)


def main(argv: Sequence[str] | None = None, mode: str = "txt2img") -> list[str]:
    """Runs the command (``mode``: txt2img, img2img or inpaint); returns the paths written (images, then
    the grid if any)."""
    tune_gc(argv)
    args = build_parser(mode).parse_args(argv)
    prompts = check_args(args, mode)
    with user_errors():
        return _sample(args, prompts, mode)


def _sample(args: argparse.Namespace, prompts: list[str], mode: str) -> list[str]:
    import jax
    import jax.numpy as jnp
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.compile_cache))  # also when quoted
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from sdjax.stable_diffusion import StableDiffusion

    sd = StableDiffusion.from_pretrained(args.checkpoint, dtype=getattr(jnp, args.dtype), tokenizer=args.tokenizer,
                                         prediction_type=args.prediction_type, allow_pickle=args.allow_pickle,
                                         variant=args.variant)
    for path, scale in args.lora:
        sd = sd.with_lora(path, scale)
    refine = {}
    if getattr(args, "refiner", None):
        refine = dict(refiner=StableDiffusion.from_pretrained(args.refiner, dtype=getattr(jnp, args.dtype),
                                                              tokenizer=args.tokenizer, variant=args.variant),
                      high_noise_frac=args.high_noise_frac)
    init = mask = None
    if mode != "txt2img":
        init = init_image(args.init_img, args.H, args.W, max(8, sd.downsample_factor))
        H, W = init.shape[:2]
    if mode == "inpaint":
        mask = init_mask(args.mask, args.init_img, args.H, args.W, max(8, sd.downsample_factor))
    else:
        H, W = args.H or sd.native_size, args.W or sd.native_size
    micro = {name: getattr(args, name) for name in MICRO_CONDITIONING + TWEAKS if getattr(args, name) is not None}
    writer = OutputWriter(args.out)
    grid = None if args.skip_grid else Grid(args.n_samples, H, W)
    batches = [(p, it) for it in range(args.n_iter) for p in prompts]
    print(f"{len(batches)} batches of {args.n_samples} at {W}x{H}, {args.steps} {args.sampler} steps, "
          f"scale {args.scale}, on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    written, start = [], time.perf_counter()
    for b, (prompt, it) in enumerate(batches):
        seed = args.seed if args.fixed_code else args.seed + b
        negative = None if args.negative_prompt is None else [args.negative_prompt] * args.n_samples
        kw = dict(negative_prompts=negative, steps=args.steps, guidance_scale=args.scale, eta=args.eta,
                  sampler=args.sampler, height=H, width=W, seed=seed, **micro)
        t0 = time.perf_counter()
        if mode == "inpaint":
            images = sd.inpaint(init, mask, [prompt] * args.n_samples, strength=args.strength, **kw)
        elif mode == "img2img":
            images = sd.img2img(init, [prompt] * args.n_samples, strength=args.strength, **kw)
        else:
            images = sd.txt2img([prompt] * args.n_samples, **refine, **kw)
        if b == 0:
            print(f"first batch (compile + run): {time.perf_counter() - t0:.1f}s")
        for j, im in enumerate(images):
            meta = dict(prompt=prompt, negative_prompt=args.negative_prompt, seed=seed, index_in_batch=j,
                        batch_size=args.n_samples, steps=args.steps, sampler=args.sampler, scale=args.scale,
                        eta=args.eta, height=H, width=W, dtype=args.dtype, checkpoint=_where(args.checkpoint),
                        loras=[[_where(p), s] for p, s in args.lora], **micro)
            if mode != "txt2img":
                meta.update(init_img=os.path.abspath(args.init_img), strength=args.strength)
            if mode == "inpaint":
                meta.update(mask=os.path.abspath(args.mask))
            if refine:
                meta.update(refiner=_where(args.refiner), high_noise_frac=args.high_noise_frac)
            written.append(writer.write(im, meta))
            if grid is not None:
                grid.add(im)
        _progress(b + 1, len(batches), start)
    print()
    if grid is None:
        print(f"wrote {len(written)} images to {args.out}")
        return written
    path = writer.write_grid(grid.render())
    print(f"wrote {len(written)} images and {path}")
    return written + [path]


def txt2img(argv: Sequence[str] | None = None) -> None:
    """``sdjax-txt2img`` (a console script's exit status comes from its return value: none)."""
    main(argv)


def img2img(argv: Sequence[str] | None = None) -> None:
    """``sdjax-img2img``."""
    main(argv, mode="img2img")


def inpaint(argv: Sequence[str] | None = None) -> None:
    """``sdjax-inpaint``."""
    main(argv, mode="inpaint")
