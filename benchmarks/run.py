"""Benchmarks of sdjax against diffusers (Flax 0.39.0 and current PyTorch), side by side on one machine.

    python -m benchmarks.run --only text2img,compile,overhead,train,scaling --size sd15 --out results.json
    ./run bench --size tiny --only text2img,overhead
    ./run bench --only aot-txt2img --peers flax --topology v5e-8     # TPU compiler's estimates, no TPU needed
    ./run bench --only aot-train --peers maxdiffusion                # SD 2 base's step beside MaxDiffusion's (v5p-8)
    ./run bench --only aot-txt2img --peers flax,maxdiffusion --aot-model sd2-base   # SD 2 base txt2img, v5p-8
    ./run bench --only data                                           # webdataset shards -> 512 px batches (no peers)
    ./run bench --only eval                       # Inception and CLIP ViT-H-14 beside pytorch-fid and open_clip

Each runner is a subprocess in its own environment (peers in venvs under .bench-envs/, created
on first use) that prints one JSON line; this script prints the table and writes all of it.
Every time is the median over --repeats warm calls, synchronised before the clock is read.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import envs, timing

BENCHMARKS = ("text2img", "compile", "overhead", "train", "scaling", "aot", "aot-txt2img", "aot-train", "data", "eval")
MAXDIFFUSION_COMMIT = "7cfb880"  # the MaxDiffusion source aot-train's peer was measured at (docs/benchmarks.md)


def defaults(gpu: bool) -> dict[str, Any]:
    """CPU: a shape two shared cores finish in minutes; GPU: the usual 512x512, 50 steps."""
    if gpu:
        return dict(height=512, width=512, steps=50, batch="1,8", jax_dtype="bfloat16", torch_dtype="float16")
    return dict(height=128, width=128, steps=4, batch="1", jax_dtype="float32", torch_dtype="float32")


def run_runner(python: str, module: str, args: list[str], env_extra: dict[str, str] | None = None,
               log: Path | None = None, result_file: Path | None = None) -> dict[str, Any]:
    """Run ``python -m module args`` from the repo root and return the JSON it printed (or wrote to
    ``result_file``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(PYTHONPATH=envs.repo_root(), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(env_extra or {})
    cmd = [python, "-m", module] + args
    print(f"[bench] {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=envs.repo_root(), env=env, capture_output=True, text=True)
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return dict(error=f"{module} exited with {proc.returncode}:\n{tail}")
    out = json.loads(result_file.read_text()) if result_file is not None else timing.parse(proc.stdout)
    out["wall_s"] = time.perf_counter() - t0
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}{unit}" if abs(x) < 1000 else f"{x:.4g}{unit}"
    return f"{x}{unit}"


def table(results: dict[str, Any]) -> str:
    """Markdown rows: benchmark, metric, sdjax, diffusers Flax, sdjax/Flax, diffusers PyTorch, sdjax/PyTorch."""
    lines = ["| benchmark | metric | sdjax | diffusers Flax 0.39 | sdjax / Flax | diffusers PyTorch "
             "| sdjax / PyTorch |",
             "|---|---|---|---|---|---|---|"]

    def row(bench, metric, ours, flax=None, torch=None, unit=""):
        lines.append(f"| {bench} | {metric} | {fmt(ours, unit)} | {fmt(flax, unit)} | {fmt(ratio(ours, flax))} | "
                     f"{fmt(torch, unit)} | {fmt(ratio(ours, torch))} |")

    for key, t in results.get("text2img", {}).items():
        s, f, p = (t.get(k, {}) for k in ("sdjax", "flax", "torch"))
        row("text2img", f"{key}: images/s", s.get("images_per_s"), f.get("images_per_s"), p.get("images_per_s"))
        row("text2img", f"{key}: s/batch", s.get("batch_s"), f.get("batch_s"), p.get("batch_s"), " s")
    if "compile" in results:
        c = results["compile"]
        row("compile", "first call (cold)", c.get("sdjax_first_call_s"), c.get("flax_first_call_s"),
            c.get("torch_first_call_s"), " s")
        row("compile", "first call, persistent cache warm", c.get("sdjax_cached_first_call_s"), unit=" s")
        warm = {name: t.get(name, {}).get("batch_s") for t in results.get("text2img", {}).values() for name in
                ("sdjax", "flax", "torch")} if results.get("text2img") else {}
        minus = {n: c.get(f"{n}_first_call_s") - warm[n] if c.get(f"{n}_first_call_s") and warm.get(n) else None
                 for n in ("sdjax", "flax")}
        # torch is eager: nothing to compile
        row("compile", "first call - warm call (compile estimate)", minus["sdjax"], minus["flax"], unit=" s")
    for key, o in results.get("overhead", {}).items():
        row("overhead", f"{key}: text2img / (steps x UNet(2B) + text + decode)", o.get("overhead"))
        for part in ("text_encoder_s", "unet_guided_s", "vae_decode_s", "ideal_s", "batch_s"):
            row("overhead", f"{key}: {part}", o.get(part), unit=" s")
    for r in results.get("train", {}).get("rows", []):
        key = f"{r['size']} {r['image_size']}px B={r['batch']} {r['dtype']} remat={r['remat']}"
        row("train", f"{key}: step", r.get("step_s"), unit=" s")
        row("train", f"{key}: images/s", r.get("images_per_s"))
        row("train", f"{key}: GFLOP/step (XLA)", (r.get("flops_per_step") or 0) / 1e9 or None)
        row("train", f"{key}: MFU vs measured matmul peak", r.get("mfu"))
        row("train", f"{key}: compiled memory (args+out-alias+temp)",
            (r.get("memory", {}).get("peak_estimate") or 0) / 2**20 or None, unit=" MiB")
        row("train", f"{key}: temporaries", (r.get("memory", {}).get("temp_size") or 0) / 2**20 or None, unit=" MiB")
        row("train", f"{key}: compile", r.get("compile_s"), unit=" s")
    for r in results.get("scaling", {}).get("rows", []):
        row("scaling", f"{r['devices']} devices: s/batch (max abs diff vs 1 device = {r['max_abs_diff_vs_1']:.2g})",
            r["batch_s"], unit=" s")
    for key, a in results.get("aot", {}).items():
        s, x, f = a.get("sdjax", {}), a.get("sdjax_xla", {}), a.get("flax", {})
        row("aot", f"{key}: compiler-optimal step (sdjax flash attention)", _ms(s), _ms(f), unit=" ms")
        row("aot", f"{key}: images/s/chip (sdjax flash attention)", _ips(s), _ips(f))
        row("aot", f"{key}: images/s/chip (sdjax XLA attention)", _ips(x), _ips(f))
        row("aot", f"{key}: model FLOPs/step, T (sdjax: its XLA-attention program's)",
            _gb(s, "model_flops", 1e12), _gb(f, "flops", 1e12))
        row("aot", f"{key}: compiler FLOPs/step, T", _gb(s, "flops", 1e12), _gb(f, "flops", 1e12))
        row("aot", f"{key}: HBM bytes accessed/step, GB", _gb(s, "bytes_accessed"), _gb(f, "bytes_accessed"))
        row("aot", f"{key}: temporaries per chip, GiB", _gb(s, "temp_bytes", 2**30), _gb(f, "temp_bytes", 2**30))
        row("aot", f"{key}: roofline MFU", s.get("mfu"), f.get("mfu"))
    for name, value in results.get("errors", {}).items():
        lines.append(f"| {name} | error | {_error_line(value)} | | | | |")
    if len(lines) == 2:  # no diffusers-peer rows (e.g. --only aot-train): that table's header alone says nothing
        lines = []
    return "\n".join(lines + _aot_txt2img_table(results.get("aot-txt2img", {}))
                     + _aot_train_table(results.get("aot-train", {}))).strip("\n")


def _error_line(text: str) -> str:
    """The line of a runner's stderr tail that names the error (its last ``...Error: ...`` line), else its last line."""
    lines = text.splitlines()
    return next((line for line in reversed(lines) if re.match(r"^[\w.]*(Error|Exception)\b", line)),
                lines[-1] if lines else "")


def _aot_txt2img_table(results: dict[str, Any]) -> list[str]:
    """aot-txt2img's rows: sdjax beside diffusers-Flax and MaxDiffusion (each where it ran)."""
    lines = []
    for key, a in results.items():
        s, f, m = (a.get(impl, {}) for impl in ("sdjax", "flax", "maxdiffusion"))
        loop = [r.get("runs", {}).get("loop", {}) for r in (s, f, m)]
        rows = [("compiler-optimal time per call, ms", _ms(s), _ms(f), _ms(m)),
                ("images/s/chip", s.get("images_per_s_per_chip"), f.get("images_per_s_per_chip"),
                 m.get("images_per_s_per_chip")),
                ("FLOPs per call, T", *(_gb(r, "flops", 1e12) for r in (s, f, m))),
                ("HBM bytes accessed per call, GB", *(_gb(r, "bytes_accessed") for r in (s, f, m))),
                ("roofline MFU (compiler's FLOPs)", *(r.get("roofline_mfu") for r in (s, f, m))),
                ("temporaries per chip (the loop), GiB", *(_gb(r, "temp_bytes", 2**30) for r in loop)),
                ("compile time on this host (the loop), s", *(r.get("compile_s") for r in loop))]
        lines += _side_by_side(key, rows, ("diffusers-Flax 0.39", f"MaxDiffusion {MAXDIFFUSION_COMMIT}"))
    return lines


def _side_by_side(key: str, rows: list[tuple], peers: tuple[str, ...]) -> list[str]:
    """A table under ``key``: each row (metric, sdjax's value, each peer's), with sdjax / peer after each peer."""
    head = "| metric | sdjax | " + " | ".join(f"{p} | sdjax / {p.split()[0]}" for p in peers) + " |"
    lines = ["", f"{key}:", "", head, "|---" * (2 + 2 * len(peers)) + "|"]
    for name, ours, *theirs in rows:
        lines.append(f"| {name} | {fmt(ours)} | " + " | ".join(f"{fmt(x)} | {fmt(ratio(ours, x))}" for x in theirs)
                     + " |")
    return lines


def _aot_train_table(results: dict[str, Any]) -> list[str]:
    """aot-train's rows, beside MaxDiffusion (not a diffusers peer: a table of its own)."""
    lines = []
    for key, a in results.items():
        s, m = a.get("sdjax", {}), a.get("maxdiffusion", {})
        hbm = s.get("hbm_gib", {})
        rows = [("compiler-optimal step, ms", _ms(s), _ms(m)),
                ("images/s/chip", s.get("images_per_s_per_chip"), m.get("images_per_s_per_chip")),
                ("FLOPs per step (compiler's count), T", _gb(s, "flops", 1e12), _gb(m, "flops", 1e12)),
                ("HBM bytes accessed per step, GB", _gb(s, "bytes_accessed"), _gb(m, "bytes_accessed")),
                ("HBM arguments per chip, GiB", hbm.get("arguments"), _gb(m, "argument_bytes", 2**30)),
                ("HBM temporaries per chip, GiB", hbm.get("temporaries"), _gb(m, "temp_bytes", 2**30)),
                ("roofline MFU (compiler's FLOPs)", s.get("roofline_mfu"), m.get("roofline_mfu")),
                ("compile time on this host, s", s.get("compile_s"), m.get("compile_s"))]
        lines += _side_by_side(key, rows, (f"MaxDiffusion {MAXDIFFUSION_COMMIT}",))
    return lines


def _ms(r: dict) -> float | None:
    """The compiler's time in ms; None where it gave none (the TPU cost model can return <= 0)."""
    return r["optimal_seconds"] * 1e3 if (r.get("optimal_seconds") or 0) > 0 else None


def _ips(r: dict) -> float | None:
    return r["per_chip_batch"] / r["optimal_seconds"] if r.get("optimal_seconds") else None


def _gb(r: dict, key: str, unit: float = 1e9) -> float | None:
    return r[key] / unit if r.get(key) is not None else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--size", default="sd15", choices=("tiny", "sd15"), help="network shapes (random weights)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", default=None, help="comma-separated batch sizes, e.g. 1,8")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=None, help="default: 8 (tiny), 1 (sd15)")
    p.add_argument("--train-image-size", type=int, default=None, help="default: 32 (tiny), 256 (sd15)")
    p.add_argument("--peers", default="flax,torch",
                   help="comma-separated peers to run ('' for none): flax, torch; maxdiffusion (aot-train, "
                        "aot-txt2img)")
    p.add_argument("--maxdiffusion-src", default=os.path.join(envs.repo_root(), "maxdiffusion", "src"),
                   help="aot-train, aot-txt2img: MaxDiffusion's src/ (git clone "
                        "https://github.com/AI-Hypercomputer/maxdiffusion; "
                        f"git checkout {MAXDIFFUSION_COMMIT})")
    p.add_argument("--topology", default="v5p-8", help="aot: the TPU slice to compile for (see sdjax.aot)")
    p.add_argument("--per-chip-batch", type=int, default=8, help="aot: images per chip")
    p.add_argument("--aot-steps", type=int, default=50, help="aot-txt2img: DDIM steps")
    p.add_argument("--aot-model", default="sd15", choices=("sd15", "sd2-base"), help="aot-txt2img: the networks")
    p.add_argument("--maxdiffusion-attention",
                   help="aot-txt2img: MaxDiffusion's attention kernel (default: its yml's; see "
                        "benchmarks/aot_txt2img.py)")
    p.add_argument("--out", default="bench-results.json")
    p.add_argument("--cache-dir", default=os.path.join(envs.repo_root(), ".bench-cache"), help="random weights")
    p.add_argument("--envs-dir", default=os.path.join(envs.repo_root(), ".bench-envs"), help="peer venvs")
    a = p.parse_args(argv)
    only = [b for b in a.only.split(",") if b]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmarks {unknown}; choose from {','.join(BENCHMARKS)}.")
    peers = [x for x in a.peers.split(",") if x]
    if set(peers) - {"flax", "torch", "maxdiffusion"}:
        p.error(f"--peers takes flax, torch and/or maxdiffusion, got {a.peers!r}.")
    md_src = os.path.join(a.maxdiffusion_src, "maxdiffusion")
    if "maxdiffusion" in peers and {"aot-train", "aot-txt2img"} & set(only) and not os.path.isdir(md_src):
        p.error(f"--peers maxdiffusion compiles MaxDiffusion's own code: no maxdiffusion/ under {a.maxdiffusion_src}. "
                "Clone it (git clone https://github.com/AI-Hypercomputer/maxdiffusion && git -C maxdiffusion checkout "
                f"{MAXDIFFUSION_COMMIT}) or give --maxdiffusion-src.")

    from benchmarks import weights

    mach = timing.machine()
    gpu = bool(mach["gpus"])
    d = defaults(gpu)
    steps, height, width = a.steps or d["steps"], a.height or d["height"], a.width or d["width"]
    batches = [int(b) for b in (a.batch or d["batch"]).split(",")]
    shape = ["--steps", str(steps), "--height", str(height), "--width", str(width), "--repeats", str(a.repeats)]
    log = Path(a.out).with_suffix(".log")
    log.write_text("")
    results: dict[str, Any] = dict(
        machine=mach, device_kind="gpu" if gpu else "cpu", started=time.strftime("%Y-%m-%d %H:%M:%S"),
        command=" ".join(["python -m benchmarks.run"] + (argv if argv is not None else sys.argv[1:])),
        config=dict(only=only, size=a.size, steps=steps, height=height, width=width, batches=batches, repeats=a.repeats,
                    sampler="ddim", guidance_scale=7.5, jax_dtype=d["jax_dtype"], torch_dtype=d["torch_dtype"]),
        versions={"sdjax-env": timing.versions("jax", "jaxlib", "flax", "diffusers", "torch", "transformers")},
        errors={})
    here = sys.executable

    if {"text2img", "compile", "overhead"} & set(only):
        folder = str(weights.ensure_folder(a.size, a.cache_dir))
        py = {name: envs.python(a.envs_dir, f"diffusers-{name}", gpu) for name in peers}
        cache = tempfile.mkdtemp(prefix="sdjax-compile-cache-")
        results["text2img"], results["overhead"] = {}, {}
        for i, b in enumerate(batches):
            key = f"{a.size} {height}x{width} {steps} steps B={b}"
            common = ["--folder", folder, "--batch", str(b)] + shape
            t: dict[str, Any] = {}
            t["sdjax"] = run_runner(here, "benchmarks.sdjax_runner", common + ["--dtype", d["jax_dtype"], "--overhead"]
                                    + (["--compile-cache", cache] if i == 0 else []), log=log)
            if "flax" in peers:
                t["flax"] = run_runner(py["flax"], "benchmarks.peer_flax", common + ["--dtype", d["jax_dtype"]],
                                       log=log)
            if "torch" in peers:
                t["torch"] = run_runner(py["torch"], "benchmarks.peer_torch", common + ["--dtype", d["torch_dtype"]],
                                        log=log)
            for name, r in t.items():
                if "error" in r:
                    results["errors"][f"text2img {key} {name}"] = r["error"]
                elif name != "sdjax":
                    results["versions"][f"diffusers-{name}-env"] = r.get("versions")
            results["text2img"][key] = t
            results["overhead"][key] = {k: t["sdjax"].get(k) for k in
                                        ("overhead", "text_encoder_s", "unet_guided_s", "vae_decode_s", "ideal_s",
                                         "batch_s")}
            if i == 0:
                cached = run_runner(here, "benchmarks.sdjax_runner", common + ["--dtype", d["jax_dtype"],
                                    "--compile-cache", cache, "--first-call-only"], log=log)
                results["compile"] = dict(
                    shape=key, sdjax_first_call_s=t["sdjax"].get("first_call_s"),
                    flax_first_call_s=t.get("flax", {}).get("first_call_s"),
                    torch_first_call_s=t.get("torch", {}).get("first_call_s"),
                    sdjax_cached_first_call_s=cached.get("first_call_s"))
                if "error" in cached:
                    results["errors"]["compile (cache warm)"] = cached["error"]
        if "overhead" not in only:
            results.pop("overhead")
        if "compile" not in only:
            results.pop("compile")
        if "text2img" not in only:
            results.pop("text2img")

    if "train" in only:
        tb = a.train_batch or (8 if a.size == "tiny" else 1)
        args = ["--size", a.size, "--batch", str(tb), "--repeats", str(a.repeats), "--dtype", d["jax_dtype"]]
        if a.train_image_size:
            args += ["--image-size", str(a.train_image_size)]
        rows = []
        if a.size == "sd15":  # also the tiny shapes, which run anywhere
            tiny = run_runner(here, "benchmarks.train_runner", ["--size", "tiny", "--batch", "8", "--repeats",
                                                                 str(a.repeats)], log=log)
            rows += tiny.get("rows", [])
            if not gpu:  # the SD 1.5 train state (params, EMA, 2 Adam moments, grads) is ~20 GB in f32
                args.append("--no-run")
        r = run_runner(here, "benchmarks.train_runner", args, log=log)
        if "error" in r:
            results["errors"]["train"] = r["error"]
        results["train"] = dict(r, rows=rows + r.get("rows", []))

    if "scaling" in only:
        folder = str(weights.ensure_folder("tiny", a.cache_dir))
        r = run_runner(here, "benchmarks.scaling_runner", ["--folder", folder, "--repeats", str(a.repeats)],
                       env_extra=dict(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"),
                       log=log)
        if "error" in r:
            results["errors"]["scaling"] = r["error"]
        results["scaling"] = r

    if "aot" in only:
        from sdjax import aot

        t = aot.TOPOLOGIES[a.topology]
        chip = aot.CHIPS[t.chip]
        args = ["--topology", t.topology_name, "--chip-config", t.chip_config_name,
                "--bounds", ",".join(map(str, t.chips_per_host_bounds)),
                "--wrap", ",".join(str(int(w)) for w in t.wrap),
                "--per-chip-batch", str(a.per_chip_batch)]
        env = dict(JAX_PLATFORMS="cpu")
        r = {"sdjax": run_runner(here, "benchmarks.aot_unet", args + ["--impl", "sdjax"], env, log=log),
             "sdjax_xla": run_runner(here, "benchmarks.aot_unet", args + ["--impl", "sdjax", "--attention", "xla"], env,
                                     log=log)}
        if "flax" in peers:
            r["flax"] = run_runner(envs.python(a.envs_dir, "diffusers-flax", tpu=True), "benchmarks.aot_unet",
                                   args + ["--impl", "flax"], env, log=log)
        # Model FLOPs: the flash kernels' backward recomputes the logits, which the compiler counts;
        # the XLA-attention program computes the same network without recomputation.
        if r["sdjax_xla"].get("flops"):
            r["sdjax"]["model_flops"] = r["sdjax_xla"]["flops"]
        for name, v in r.items():
            if "error" in v:
                results["errors"][f"aot {name}"] = v["error"]
            elif v.get("optimal_seconds") and v.get("flops"):
                v["mfu"] = v.get("model_flops", v["flops"]) / (v["optimal_seconds"] * chip.bf16_tflops * 1e12)
        results["aot"] = {f"SD 1.5 UNet fwd+bwd 512px, {a.per_chip_batch}/chip, {a.topology} (compiler-estimated)": r}

    if "aot-txt2img" in only:
        results["aot-txt2img"] = aot_txt2img(a, peers, log, results["errors"])
    if "aot-train" in only:
        results["aot-train"] = aot_train(a, peers, log, results["errors"])
    if "data" in only:  # sdjax's own reader, no peer: its table prints as it runs
        from benchmarks import data_path
        results["data"] = data_path.main([])
    if "eval" in only:  # the evaluation's judges beside pytorch-fid and open_clip: its table prints as it runs
        from benchmarks import eval_judges
        results["eval"] = eval_judges.main([])

    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["load_avg_end"] = list(os.getloadavg())
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nload average at start {mach['load_avg']}, at end {results['load_avg_end']}; "
          f"JSON: {a.out}, runner logs: {log}")


def sd2_base_model() -> dict:
    """SD 2 base as configs/sd2_base.py trains it: sd21's networks with its 512 px UNet (64-wide heads)."""
    from sdjax import presets
    from sdjax.configs import sd2_base

    model = presets.sd21()
    model["unet"] = sd2_base.get_config().model.unet.to_dict()
    return model


def aot_train(a, peers: list[str], log: Path, errors: dict) -> dict:
    """SD 2 base's whole train step as MLPerf trains it (512 px, v-prediction, from cached VAE
    moments and text-encoder outputs, bf16 compute, f32 weights, AdamW, data-parallel), compiled for
    ``--topology`` at ``--per-chip-batch`` by sdjax (``configs/sd2_base.py`` with ``train.cache_text``,
    through ``sdjax.aot``) and, with ``--peers maxdiffusion``, by MaxDiffusion's own trainer
    (``benchmarks/aot_train_maxdiffusion.py``: its ``dataset_type=grain`` step, MLPerf's layout)."""
    from sdjax import aot

    t = aot.TOPOLOGIES[a.topology]
    chip = aot.CHIPS[t.chip]
    tmp = Path(tempfile.mkdtemp())
    out = {}
    report = tmp / "sdjax.json"
    r = run_runner(sys.executable, "sdjax.aot", ["--config", "sd2_base", "--preset", "sd21", "--topology", a.topology,
                                                 "--per-chip-batch", str(a.per_chip_batch), "--set",
                                                 "train.cache_text=True", "--out", str(report)],
                   dict(JAX_PLATFORMS="cpu"), log=log, result_file=report)
    if "error" in r:
        errors["aot-train sdjax"] = r["error"]
    else:
        out["sdjax"] = r["reports"][0]
    if "maxdiffusion" in peers:
        model = tmp / "sd2base.json"
        model.write_text(json.dumps(sd2_base_model()))
        r = run_runner(envs.python(a.envs_dir, "maxdiffusion", tpu=True), "benchmarks.aot_train_maxdiffusion",
                       ["--model", str(model), "--topology", t.topology_name, "--chip-config", t.chip_config_name,
                        "--bounds", ",".join(map(str, t.chips_per_host_bounds)),
                        "--wrap", ",".join(str(int(w)) for w in t.wrap), "--per-chip-batch", str(a.per_chip_batch)],
                       dict(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([envs.repo_root(), a.maxdiffusion_src])),
                       log=log)
        if "error" in r:
            errors["aot-train maxdiffusion"] = r["error"]
        else:
            r["commit"] = MAXDIFFUSION_COMMIT
            if r.get("optimal_seconds") and r["optimal_seconds"] > 0:
                r["images_per_s_per_chip"] = a.per_chip_batch / r["optimal_seconds"]
                r["roofline_mfu"] = r["flops"] / (r["optimal_seconds"] * chip.bf16_tflops * 1e12)
            out["maxdiffusion"] = r
    return {f"SD 2 base train step 512px, {a.per_chip_batch}/chip, {a.topology} (compiler-estimated)": out}


def txt2img_model(name: str) -> dict:
    """aot-txt2img's networks: SD 1.5, or SD 2 base (512 px, epsilon prediction)."""
    from sdjax import presets

    if name == "sd15":
        return presets.sd15()
    model = sd2_base_model()
    model["scheduler"] = dict(model["scheduler"], prediction_type="epsilon")
    return model


def aot_txt2img(a, peers: list[str], log: Path, errors: dict) -> dict:
    """``--aot-model``'s txt2img at 512 px, ``--aot-steps`` DDIM steps, guidance 7.5, compiled for
    ``--topology`` by sdjax and the peers (diffusers-Flax's ``_generate``; MaxDiffusion's
    ``generate.run_inference``, ``--maxdiffusion-attention``): each program as users run it (the
    loop: memory, compile time) and with 1 and 2 steps written out, whose costs give the loop's
    (XLA's cost analysis counts a loop's body once)."""
    from sdjax import aot

    t = aot.TOPOLOGIES[a.topology]
    chip = aot.CHIPS[t.chip]
    model = Path(tempfile.mkdtemp()) / f"{a.aot_model}.json"
    model.write_text(json.dumps(txt2img_model(a.aot_model)))
    args = ["--model", str(model), "--topology", t.topology_name, "--chip-config", t.chip_config_name,
            "--bounds", ",".join(map(str, t.chips_per_host_bounds)), "--wrap", ",".join(str(int(w)) for w in t.wrap),
            "--per-chip-batch", str(a.per_chip_batch)]
    runners = {"sdjax": (sys.executable, [], {})}
    if "flax" in peers:
        runners["flax"] = (envs.python(a.envs_dir, "diffusers-flax", tpu=True), [], {})
    if "maxdiffusion" in peers:
        runners["maxdiffusion"] = (
            envs.python(a.envs_dir, "maxdiffusion", tpu=True),
            ["--attention", a.maxdiffusion_attention] if a.maxdiffusion_attention else [],
            dict(PYTHONPATH=os.pathsep.join([envs.repo_root(), a.maxdiffusion_src])))
    out = {}
    for impl, (python, impl_args, env) in runners.items():
        runs = {}
        for name, extra in (("loop", ["--steps", str(a.aot_steps)]), ("one", ["--steps", "1", "--unroll"]),
                            ("two", ["--steps", "2", "--unroll"])):
            runs[name] = run_runner(python, "benchmarks.aot_txt2img", args + ["--impl", impl] + impl_args + extra,
                                    dict(JAX_PLATFORMS="cpu", **env), log=log)
        if any("error" in r for r in runs.values()):
            errors[f"aot-txt2img {impl}"] = next(r["error"] for r in runs.values() if "error" in r)
            continue
        cost = aot.loop_cost(*({"flops": r["flops"], "bytes accessed": r["bytes_accessed"],
                                "optimal_seconds": r["optimal_seconds"]} for r in (runs["one"], runs["two"])),
                             a.aot_steps)
        out[impl] = dict(runs=runs, steps=a.aot_steps, per_chip_batch=a.per_chip_batch,
                         **aot.cost_figures(cost, a.per_chip_batch, chip))
        if impl == "maxdiffusion":
            out[impl].update(commit=MAXDIFFUSION_COMMIT, attention=a.maxdiffusion_attention or "its yml's")
    name = {"sd15": "SD 1.5", "sd2-base": "SD 2 base"}[a.aot_model]
    return {f"{name} txt2img 512px, {a.aot_steps} DDIM steps, {a.per_chip_batch}/chip, {a.topology} "
            "(compiler-estimated)": out}


if __name__ == "__main__":
    main()
