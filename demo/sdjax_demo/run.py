"""The main job on the built-in default: both training phases, sampling and scoring, on a CPU.

    ./run demo                       # = sdjax-demo --workdir demo-output

1. prepares the synthetic captioned-shapes set through its TFDS builder;
2. trains the tiny autoencoder (``sdjax-train autoencoder --config tiny_autoencoder``);
3. trains the tiny latent diffusion model on its latents (``sdjax-train latent --config tiny``);
4. samples every (shape, colour) pair, the held-out ones included (``sdjax-txt2img``);
5. judges each sample's pixels (``sdjax_demo.shapes_score``) and prints shape and colour accuracy
   for seen and held-out pairs, next to the judge's own accuracy on real images.

Each phase runs as its own process through the same command lines a user runs.

Re-running reuses the prepared data and resumes (or skips) finished phases.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from sdjax_demo.shapes_score import accuracy

DEMO_BACKGROUNDS = ("green", "white")


def _run(cmd: list[str], log: str, **env_vars: str) -> None:
    """Run one phase, streaming its output, and stop the demo if it fails."""
    print("$ " + "".join(f"{k}={v} " for k, v in env_vars.items()) + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_vars)
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if not line.startswith(("I1", "W1")):  # absl's INFO/WARNING lines go to the log only
                print(line, end="", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"demo: {' '.join(cmd[2:4])} failed (exit {proc.returncode}); see {log}")


def cpu_devices(n: int) -> dict[str, str]:
    """Environment that splits the host CPU into ``n`` XLA devices (a no-op for GPU/TPU runs)."""
    if n <= 1 or "XLA_FLAGS" in os.environ:
        return {}
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def prompts_to_sample() -> list[tuple[str, int, int, bool]]:
    """(prompt, shape, colour, held_out) for every shape/colour pair on a couple of backgrounds."""
    from sdjax.data import COLOR_NAMES, SHAPES, caption, is_heldout

    out = []
    for s in range(len(SHAPES)):
        for c in range(len(COLOR_NAMES)):
            for bg_name in DEMO_BACKGROUNDS:
                bg = COLOR_NAMES.index(bg_name)
                if bg == c:
                    bg = COLOR_NAMES.index("purple" if COLOR_NAMES[c] != "purple" else "yellow")
                out.append((caption(s, c, bg), s, c, is_heldout(s, c)))
    return out


def judge_real_images(data_dir: str, n: int = 500) -> dict[str, float]:
    """The judge's accuracy on real test-split images: how far its verdicts can be trusted."""
    from sdjax.data import DataConfig, builder
    source = builder(DataConfig(data_dir=data_dir, num_examples=2000)).as_data_source("test")
    ex = [source[i] for i in range(min(n, len(source)))]
    return accuracy(np.stack([e["image"] for e in ex]), np.array([e["shape"] for e in ex]),
                    np.array([e["color"] for e in ex]))


def score_samples(sample_dir: str, wanted: dict[str, tuple[int, int, bool]]) -> dict[str, dict[str, float]]:
    from PIL import Image

    groups: dict[str, list] = {"seen": [], "held_out": []}
    for meta_path in sorted(glob.glob(os.path.join(sample_dir, "0*.json"))):
        with open(meta_path) as f:
            meta = json.load(f)
        shape, color, held_out = wanted[meta["prompt"]]
        image = np.asarray(Image.open(meta_path[:-5] + ".png").convert("RGB"))
        groups["held_out" if held_out else "seen"].append((image, shape, color))
    out = {}
    for name, items in groups.items():
        ims, sh, co = zip(*items)
        out[name] = dict(accuracy(np.stack(ims), np.array(sh), np.array(co)), images=len(items))
    return out


def pair_grid(sample_dir: str, prompts: list[tuple[str, int, int, bool]], path: str, columns: int = 8) -> None:
    """One row per shape/colour pair (its first background's prompt), up to `columns` samples each."""
    from PIL import Image

    images: dict[str, list[str]] = {}
    for meta_path in sorted(glob.glob(os.path.join(sample_dir, "0*.json"))):
        with open(meta_path) as f:
            images.setdefault(json.load(f)["prompt"], []).append(meta_path[:-5] + ".png")
    rows, pairs = [], set()
    for prompt, shape, color, _ in prompts:
        if (shape, color) not in pairs:
            pairs.add((shape, color))
            rows.append(images[prompt][:columns])
    size = Image.open(rows[0][0]).size[0]
    grid = Image.new("RGB", (size * columns, size * len(rows)), "white")
    for i, files in enumerate(rows):
        for j, f in enumerate(files):
            grid.paste(Image.open(f).convert("RGB"), (size * j, size * i))
    grid.save(path)


def run(argv: list[str] | None = None) -> dict:
    """Runs the demo; returns its report (also written to WORKDIR/report.json)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="demo-output")
    p.add_argument("--ae-steps", type=int, default=1000, help="autoencoder training steps")
    p.add_argument("--ae-lr", type=float, default=2e-3, help="autoencoder learning rate")
    p.add_argument("--gan", action="store_true",
                   help="switch the autoencoder's GAN loss on for its last quarter (off by default: in a few "
                        "hundred steps it costs sharpness, as in the originals it needs a converged autoencoder)")
    p.add_argument("--latent-steps", type=int, default=6000, help="latent diffusion training steps")
    p.add_argument("--latent-batch", type=int, default=16, help="latent diffusion batch size")
    p.add_argument("--cpu-devices", type=int, default=2,
                   help="on a CPU, train the latent model data-parallel over this many host devices "
                        "(XLA_FLAGS=--xla_force_host_platform_device_count); 2 is ~13%% faster than one "
                        "device on 2 cores. Ignored if XLA_FLAGS is already set or a GPU/TPU is used")
    p.add_argument("--n-samples", type=int, default=16, help="samples per prompt")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of both trainings (initialisation, data order, noise) and of the samples")
    p.add_argument("--latent-config", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of the latent phase's config, e.g. train.learning_rate=5e-4 (repeatable)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    w = os.path.abspath(args.workdir)
    os.makedirs(w, exist_ok=True)
    log = os.path.join(w, "demo.log")
    data_dir, vae_dir, model_dir = (os.path.join(w, d) for d in ("data", "vae", "model"))
    py = sys.executable
    common = [f"--config.data.data_dir={data_dir}", f"--config.data.seed={args.seed}",
              f"--config.train.seed={args.seed}"]
    timings = {}

    print(f"== 1/5 preparing the captioned-shapes set in {data_dir}", flush=True)
    from sdjax.data import DataConfig, prepare
    t = time.perf_counter()
    prepare(DataConfig(data_dir=data_dir, num_examples=2000))
    timings["prepare_s"] = time.perf_counter() - t

    print(f"== 2/5 training the autoencoder ({args.ae_steps} steps)", flush=True)
    t = time.perf_counter()
    if not os.path.isdir(vae_dir):
        _run([py, "-m", "sdjax.cli.train", "autoencoder", "--config", "tiny_autoencoder",
              "--workdir", os.path.join(w, "autoencoder"), "--export", vae_dir,
              f"--config.train.steps={args.ae_steps}", f"--config.train.learning_rate={args.ae_lr}",
              f"--config.loss.disc_start={int(args.ae_steps * 0.75) if args.gan else args.ae_steps + 1}",
              *common], log)
    timings["autoencoder_s"] = time.perf_counter() - t

    print(f"== 3/5 training latent diffusion ({args.latent_steps} steps)", flush=True)
    t = time.perf_counter()
    if not os.path.isdir(model_dir):
        _run([py, "-m", "sdjax.cli.train", "latent", "--config", "tiny", "--workdir", os.path.join(w, "latent"),
              "--export", model_dir, f"--config.autoencoder.path={vae_dir}",
              f"--config.train.steps={args.latent_steps}", f"--config.train.batch_size={args.latent_batch}",
              f"--config.train.sample_every={max(args.latent_steps // 4, 1)}",
              # a dozen checkpoints over a long run, none more often than every 50 steps (a short run
              # saves its last step only)
              f"--config.train.checkpoint_every={max(args.latent_steps // 12, 50)}",
              "--config.train.cache_latents=True", *common, *(f"--config.{kv}" for kv in args.latent_config)], log,
             **cpu_devices(args.cpu_devices))
    timings["latent_s"] = time.perf_counter() - t

    print("== 4/5 sampling every shape/colour pair, held-out pairs included", flush=True)
    t = time.perf_counter()
    prompts = prompts_to_sample()
    prompt_file = os.path.join(w, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(pr for pr, *_ in prompts) + "\n")
    sample_dir = os.path.join(w, "samples")
    shutil.rmtree(sample_dir, ignore_errors=True)
    _run([py, "-m", "sdjax.cli.txt2img", "--checkpoint", model_dir, "--from-file", prompt_file,
          "--n-samples", str(args.n_samples), "--steps", str(args.sample_steps), "--scale", str(args.scale),
          "--sampler", "ddim", "--seed", str(args.seed), "--out", sample_dir], log)
    timings["sample_s"] = time.perf_counter() - t

    print("== 5/5 scoring the samples' pixels", flush=True)
    scores = score_samples(sample_dir, {pr: (s, c, h) for pr, s, c, h in prompts})
    judge = judge_real_images(data_dir)
    timings["total_s"] = time.perf_counter() - t0
    grid = os.path.join(w, "pairs.png")
    pair_grid(sample_dir, prompts, grid)
    report = dict(scores=scores, judge_on_real_images=judge, timings=timings, args=vars(args), grid=grid)
    with open(os.path.join(w, "report.json"), "w") as f:
        json.dump(report, f, indent=2)

    print(f"\n{'':<22}{'images':>8}{'shape':>9}{'colour':>9}{'both':>9}")
    for name, label in (("seen", "seen pairs"), ("held_out", "held-out pairs")):
        r = scores[name]
        print(f"{label:<22}{r['images']:>8}{r['shape']:>9.1%}{r['color']:>9.1%}{r['both']:>9.1%}")
    print(f"{'judge on real images':<22}{'':>8}{judge['shape']:>9.1%}{judge['color']:>9.1%}{judge['both']:>9.1%}")
    print("\ntimes: " + ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in timings.items()))
    print(f"samples, a row per shape/colour pair: {grid}\nreport: {os.path.join(w, 'report.json')}")
    return report


def main(argv: list[str] | None = None) -> None:
    """``sdjax-demo`` (a console script's exit status comes from its return value: none)."""
    run(argv)


if __name__ == "__main__":
    main()
