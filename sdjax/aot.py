"""Ahead-of-time report: the real train step (or txt2img program) of a config, compiled for a TPU
slice (or this host's own devices) on any host, with the compiler's per-chip numbers.

    python -m sdjax.aot --config sd15_finetune --preset sd15 --topology v5p-8 --per-chip-batch 8
    python -m sdjax.aot --config sd2_base --preset sd21 --topology v6e-8 --what both --out report.json
    python -m sdjax.aot --config tiny --topology host          # this host's devices (CPU, GPU)
    python -m sdjax.aot --preset sdxl --what txt2img --topology v5p-8 --sampler euler --steps 30 --per-chip-batch 4

TPU topologies need libtpu (``pip install ".[tpu]"``), which compiles for a slice without one:
``jax.experimental.topologies`` describes the slice's devices, the step is lowered with abstract
arguments carrying their shardings, and XLA's TPU compiler reports memory (``memory_analysis``)
and cost (``cost_analysis``: FLOPs, bytes accessed, and its roofline ``optimal_seconds``).
Every figure is compiler-estimated, not measured. ``--preset`` gives the architecture for configs
that read it from ``pretrained`` (no checkpoint is read: parameters are shapes only).
"""

import argparse
import ast
import dataclasses
import json
import math
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import configs as configs_lib, generate, presets, sharding, sources as sources_lib
from sdjax.cli import tune_gc
from sdjax.evaluation import clip_score, features
from sdjax.evaluation.evaluator import read_clip_config
from sdjax.models.clip import CLIPConfig, CLIPModel
from sdjax.models.configs import ModelConfigs, abstract_params
from sdjax.models.inception import FIDInceptionV3
from sdjax.models.layers import ATTENTION
from sdjax.samplers import get_sampler
from sdjax.training import latent
from sdjax.training.schema import LatentRunConfig, ModelSource

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's per-chip figures (public specifications)."""
    hbm_gib: float
    bf16_tflops: float
    hbm_gbps: float


CHIPS = {"v4": Chip(32, 275, 1200), "v5e": Chip(16, 197, 819), "v5p": Chip(95, 459, 2765),
         "v6e": Chip(32, 918, 1640)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice as ``jax.experimental.topologies.get_topology_desc`` takes it."""
    name: str
    chip: str
    topology_name: str
    chip_config_name: str
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]


def _topologies() -> dict[str, Topology]:
    """v5e/v6e-N (N chips, one device each, 2-D) and v4/v5p-N (N TensorCores = N/2 megacore chips, 3-D)."""
    out = {}
    for gen in ("v5e", "v6e"):
        for n, shape in ((1, "1x1"), (4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"),
                         (256, "16x16")):
            wrap = (n == 256, n >= 128, False)
            out[f"{gen}-{n}"] = Topology(f"{gen}-{n}", gen, f"{gen}:{shape}", "default",
                                         (1, 1, 1) if n == 1 else (2, 2, 1), wrap)
    for gen, prefix in (("v4", "v4"), ("v5p", "v5")):
        for cores, shape in ((8, "2x2x1"), (16, "2x2x2"), (32, "2x2x4"), (64, "2x4x4"), (128, "4x4x4"),
                             (256, "4x4x8"), (512, "4x8x8"), (1024, "8x8x8")):
            out[f"{gen}-{cores}"] = Topology(f"{gen}-{cores}", gen, f"{prefix}:{shape}", "megacore", (2, 2, 1),
                                             (cores >= 128,) * 3)
    return out


TOPOLOGIES = _topologies()


def topology_devices(name: str, num_slices: int = 1) -> tuple[list, Chip | None]:
    """The devices of a slice (``host``: this host's own) and its chip's figures."""
    if name == "host":
        return list(jax.devices()), None
    if name not in TOPOLOGIES:
        raise ValueError(f"--topology {name}: unknown; use host or one of {', '.join(TOPOLOGIES)}.")
    t = TOPOLOGIES[name]
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=t.topology_name,
                                            chip_config_name=t.chip_config_name,
                                            chips_per_host_bounds=t.chips_per_host_bounds, num_slices=num_slices,
                                            wrap=t.wrap)
    except Exception as e:  # noqa: BLE001 - jax raises several types when libtpu is missing
        raise ValueError(f"--topology {name}: cannot describe the TPU slice ({type(e).__name__}: {e}). "
                         "Install libtpu for the installed jax: pip install '.[tpu]'.") from e
    return list(desc.devices), CHIPS[t.chip]


def _source(config) -> ModelSource:
    return LatentRunConfig.from_config(config).model


def _sds(tree: Any, sharding_tree: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding_tree)


def compile_train(config, devices: list, per_chip_batch: int, preset: str | None):
    """The config's train step compiled for ``devices``: (compiled, global batch, the built run)."""
    config = config.copy_and_resolve_references()
    config.train.batch_size = per_chip_batch * len(devices)
    run_config = LatentRunConfig.from_config(config)
    with tempfile.TemporaryDirectory() as workdir:
        run = latent.build(run_config, workdir, devices=devices, sources=sources_lib.abstract(run_config.model, preset))
    state = run.program.restore_target()
    size = run_config.data.image_size
    batch = run.batch_spec(size, size)
    return run.program.step.lower(state, batch, run.frozen).compile(), run_config.train.batch_size, run


def txt2img_configs(config, preset: str | None) -> ModelConfigs:
    """The networks a txt2img report compiles: the config's model (a preset's architecture with its
    ``model.*``), or with no config the preset's alone."""
    if config is None:
        if not preset:
            raise ValueError("--what txt2img needs --config or --preset (e.g. --preset sdxl).")
        return ModelConfigs.from_dicts(presets.get(preset))
    return ModelConfigs.from_dicts(sources_lib.model_dicts(_source(config), preset))


def abstract_inputs(configs: ModelConfigs, batch: int, size: int, batch_sharding: Any) -> generate.Inputs:
    """Txt2img's per-image inputs as shapes: the prompt's and negative prompt's token ids for each text
    encoder, the starting noise, and SDXL's micro-conditioning numbers and zero-conditioning flag."""
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)  # noqa: E731
    side = size // configs.vae.downsample_factor
    ids = {name: sds((batch, getattr(configs, name).max_position_embeddings), jnp.int32)
           for name in configs.text_encoder_names}
    noise = sds((batch, side, side, configs.vae.latent_channels), jnp.float32)
    first, second = ids.get("text_encoder"), ids.get("text_encoder_2")
    if not configs.is_sdxl:
        return generate.Inputs(first, first, noise)
    time_ids = sds((batch, 5 if configs.requires_aesthetics_score else 6), jnp.float32)
    return generate.Inputs(first, first, noise, cond_ids_2=second, uncond_ids_2=second, time_ids=time_ids,
                           uncond_time_ids=time_ids, uncond_keep=sds((batch,), jnp.float32))


def compile_txt2img(configs: ModelConfigs, devices: list, per_chip_batch: int, steps: int, dtype: str,
                    attention: str = "auto", unroll: bool = False, size: int | None = None, sampler: str = "ddim"):
    """The txt2img program (text encoding, guided sampling loop, decoding) compiled for ``devices``:
    (compiled, global batch, image side). ``unroll``: the sampler's steps written out instead of one
    loop; ``size``: the image side (None: the model's native size)."""
    mesh = sharding.data_mesh(devices)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    nets = sources_lib.generation_networks(configs, getattr(jnp, dtype), attention=attention,
                                           platform=devices[0].platform)
    params = _sds(abstract_params(configs), jax.tree.map(lambda _: rep, abstract_params(configs)))
    B = per_chip_batch * len(devices)
    size = size or configs.unet.sample_size * configs.vae.downsample_factor
    inputs = abstract_inputs(configs, B, size, batch_sharding)
    plan = get_sampler(sampler).make_plan(configs.scheduler, steps)
    plan = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=rep), plan)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    fn = jax.jit(lambda *a: generate.generate_on(mesh, nets, sampler, 0, *a, unroll=unroll),
                 out_shardings=batch_sharding)
    return fn.lower(params, inputs, key, plan, scalar, scalar).compile(), B, size


def _first(cost: Any) -> dict:
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|f64|s64)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def largest_buffers(hlo_text: str, top: int = 5) -> list[str]:
    """The largest array shapes the compiled program produces (a hint at what fills memory)."""
    sizes = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = ([^ ]+)", line)
        if not m:
            continue
        for dt, dims in _SHAPE.findall(m.group(2)):
            n = math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dt]
            sizes[f"{dt}[{dims}]"] = max(sizes.get(f"{dt}[{dims}]", 0), n)
    return [f"{shape} {n / GIB:.2f} GiB" for shape, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:top]]


def custom_kernels(hlo_text: str) -> list[str]:
    """Custom calls in the program (Pallas/Mosaic kernels appear as tpu_custom_call)."""
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo_text)))


def report(compiled, per_chip_batch: int, chip: Chip | None, what: str, compile_s: float,
           hlo_path: str | None = None) -> dict:
    """The compiler's per-chip figures of one compiled program; ``hlo_path``: also write its HLO text there."""
    mem = compiled.memory_analysis()
    cost = _first(compiled.cost_analysis())
    hlo = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    args, temps = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
    outs, alias = int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes)
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    total = args + temps + outs - alias + code
    out = {"what": what, "compile_s": round(compile_s, 1), "per_chip_batch": per_chip_batch,
           "hbm_gib": {"arguments": args / GIB, "temporaries": temps / GIB, "outputs_not_aliased": (outs - alias) / GIB,
                       "code": code / GIB, "total": total / GIB},
           "custom_kernels": custom_kernels(hlo), "largest_buffers": largest_buffers(hlo)}
    if chip is not None:
        out["chip"] = dataclasses.asdict(chip)
        out["fits"] = total <= chip.hbm_gib * GIB
    return out | cost_figures(cost, per_chip_batch, chip)


def cost_figures(cost: dict, per_chip_batch: int, chip: Chip | None) -> dict:
    """FLOPs, bytes and roofline time of a cost analysis, and the images/s and MFU they imply."""
    out = {"flops": cost.get("flops"), "transcendentals": cost.get("transcendentals"),
           "bytes_accessed": cost.get("bytes accessed"), "optimal_seconds": cost.get("optimal_seconds")}
    seconds = cost.get("optimal_seconds")
    if seconds and seconds > 0:
        out["images_per_s_per_chip"] = per_chip_batch / seconds
        if chip is not None and cost.get("flops"):
            out["roofline_mfu"] = cost["flops"] / (seconds * chip.bf16_tflops * 1e12)
    return out


def loop_cost(one: dict, two: dict, steps: int) -> dict:
    """The cost of a ``steps``-step loop from the costs of the same program with 1 and 2 steps
    written out: one + (steps - 1) * (two - one). XLA's cost analysis counts a loop's body once,
    whatever its trip count, so the looped program's own figures describe one step."""
    keys = ("flops", "transcendentals", "bytes accessed", "optimal_seconds")
    return {k: one[k] + (steps - 1) * (two[k] - one[k]) for k in keys if k in one and k in two}


def txt2img_report(configs: ModelConfigs, devices: list, chip: Chip | None, args, per_chip_batch: int | None = None,
                   steps: int | None = None, size: int | None = None, sampler: str | None = None) -> dict:
    """The real txt2img program's memory and compile time, and its cost for ``steps`` (default
    ``args.steps``) steps from the 1- and 2-step programs with the steps written out (``loop_cost``)."""
    per_chip_batch, steps = per_chip_batch or args.per_chip_batch, steps or args.steps
    sampler, size = sampler or args.sampler, size or args.size
    t0 = time.perf_counter()
    compiled, batch, size = compile_txt2img(configs, devices, per_chip_batch, steps, args.dtype, args.attention,
                                            size=size, sampler=sampler)
    r = report(compiled, per_chip_batch, chip, f"txt2img {size}x{size}, {steps} {sampler} steps, global batch {batch}",
               time.perf_counter() - t0)
    print(f"compiled the {steps}-step txt2img program in {time.perf_counter() - t0:.0f} s "
          f"({r['hbm_gib']['total']:.2f} GiB per chip); now the 1- and 2-step programs with the steps written out, "
          "for its cost", flush=True)
    costs = []
    for n in (1, 2):
        t1 = time.perf_counter()
        costs.append(_first(compile_txt2img(configs, devices, per_chip_batch, n, args.dtype, args.attention,
                                            unroll=True, size=size, sampler=sampler)[0].cost_analysis()))
        print(f"compiled the {n}-step program in {time.perf_counter() - t1:.0f} s", flush=True)
    one, two = costs
    r.update(cost_figures(loop_cost(one, two, steps), per_chip_batch, chip))
    r["cost_from"] = "the 1- and 2-step programs, steps written out, extrapolated linearly"
    return r


def compile_judges(devices: list, per_chip_batch: int, size: int, clip_config: CLIPConfig = CLIPConfig()):
    """The evaluator's two judges compiled for ``devices`` as it runs them, on ``size``-px images:
    pytorch-fid's Inception (features of the float images) and the CLIP model (image-caption cosines
    of the preprocessed images); parameters replicated, the batch split over every device. Each as
    (compiled, compile seconds)."""
    mesh = sharding.data_mesh(devices)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    B, key = per_chip_batch * len(devices), jax.random.key(0)

    def compiled(fn, init, *inputs):
        params = jax.eval_shape(lambda: init(key, *(jnp.zeros((1, *x.shape[1:]), x.dtype) for x in inputs)))["params"]
        params = _sds(params, jax.tree.map(lambda _: rep, params))
        t0 = time.perf_counter()
        return jax.jit(fn, out_shardings=rows).lower(params, *inputs).compile(), time.perf_counter() - t0

    images = jax.ShapeDtypeStruct((B, size, size, 3), jnp.float32, sharding=rows)
    pixels = jax.ShapeDtypeStruct((B, clip_config.vision.image_size, clip_config.vision.image_size, 3), jnp.float32,
                                  sharding=rows)
    ids = jax.ShapeDtypeStruct((B, clip_config.text.max_position_embeddings), jnp.int32, sharding=rows)
    return (compiled(features.inception_fn(), FIDInceptionV3().init, images),
            compiled(clip_score.cosines_fn(clip_config), CLIPModel(clip_config).init, pixels, ids))


MLPERF_EVAL_CAPTIONS = 30_000  # COCO-2014 validation captions


def eval_report(config, devices: list, chip: Chip | None, args, train: dict | None) -> list[dict]:
    """The config's in-training evaluation (``config.eval``): the generation program and both judges
    (the CLIP one ``eval.clip_config``'s, default ViT-H-14) at the eval's per-chip batch, and a summary:
    seconds per evaluation of MLPerf's 30,000 captions on these devices, and (with ``train``, the train
    step's report) its share of the run's time when it runs every ``eval.every`` steps."""
    run_config = LatentRunConfig.from_config(config)
    e, chips = run_config.eval, len(devices)
    per_chip = -(-e.batch_size // chips)
    size = e.size or run_config.data.image_size
    reports = [txt2img_report(txt2img_configs(config, args.preset), devices, chip, args, per_chip, e.steps, size,
                              e.sampler)]
    reports[-1]["what"] = f"eval images: {reports[-1]['what']}, guidance {e.guidance_scale}"
    clip_config = read_clip_config(e.clip_config)
    side = clip_config.vision.image_size
    names = (f"eval Inception features of {size}x{size} images", f"eval CLIP cosines ({side}x{side} image, caption)")
    for what, (program, seconds) in zip(names, compile_judges(devices, per_chip, size, clip_config)):
        reports.append(report(program, per_chip, chip, f"{what}, global batch {per_chip * chips}", seconds))
    seconds = dict(zip(("generate", "inception", "clip"), (r.get("optimal_seconds") for r in reports)))
    if not all(t and t > 0 for t in seconds.values()):
        return reports  # the cost model gave no time for one of them (format_report says which)
    train_rate = train.get("images_per_s_per_chip") if train else None
    return reports + [eval_summary(seconds, per_chip * chips, chips, e.every * config.train.batch_size, train_rate)]


def eval_summary(seconds_per_call: dict[str, float], global_batch: int, chips: int, every_images: int,
                 train_images_per_s_per_chip: float | None, captions: int = MLPERF_EVAL_CAPTIONS) -> dict:
    """One evaluation's time from its programs' times per call (``captions`` in calls of ``global_batch``,
    the last padded) and, given the train step's rate, its share of a run that evaluates every
    ``every_images`` training images."""
    calls = -(-captions // global_batch)
    out = {"what": "eval summary", "captions": captions, "global_batch": global_batch, "calls": calls,
           "seconds_per_call": seconds_per_call, "seconds_per_eval": calls * sum(seconds_per_call.values())}
    if train_images_per_s_per_chip and every_images:
        train_s = every_images / (train_images_per_s_per_chip * chips)
        out.update(every_images=every_images, train_seconds_between_evals=train_s,
                   eval_share=out["seconds_per_eval"] / (out["seconds_per_eval"] + train_s))
    return out


def state_sizes(run: latent.LatentRun) -> dict:
    """The whole train state's size (params, EMA, optimizer state; all chips together) and the number
    of trained parameters: what a LoRA run saves against a full fine-tune."""
    state = run.program.restore_target()
    nbytes = lambda tree: sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    return {"train_state_gib": nbytes(state) / GIB,
            "trained_parameters": int(sum(x.size for x in jax.tree.leaves(state.params)))}


def format_eval_summary(s: dict) -> str:
    lines = [f"eval of {s['captions']:,} captions in {s['calls']} calls of {s['global_batch']} images "
             f"(compiler-estimated): {s['seconds_per_eval']:.0f} s (per call: "
             + ", ".join(f"{k} {v:.3f} s" for k, v in s["seconds_per_call"].items()) + ")"]
    if "eval_share" in s:
        lines.append(f"  every {s['every_images']:,} training images ({s['train_seconds_between_evals']:.0f} s of "
                     f"training): {s['eval_share']:.1%} of the run's time")
    return "\n".join(lines)


def format_report(r: dict) -> str:
    if r["what"] == "eval summary":
        return format_eval_summary(r)
    h = r["hbm_gib"]
    lines = [f"{r['what']} (compiler-estimated, per chip; compiled in {r['compile_s']} s):",
             f"  HBM: arguments {h['arguments']:.2f} GiB + temporaries {h['temporaries']:.2f} GiB + outputs "
             f"{h['outputs_not_aliased']:.2f} GiB = {h['total']:.2f} GiB"
             + (f" of {r['chip']['hbm_gib']} GiB" if "chip" in r else "")]
    if r.get("fits") is False:
        lines.append("  DOES NOT FIT: largest buffers " + "; ".join(r["largest_buffers"]))
    if r["flops"] is not None:
        lines.append(f"  FLOPs {r['flops'] / 1e12:.3f} T, bytes accessed {(r['bytes_accessed'] or 0) / 1e9:.2f} GB")
    if "images_per_s_per_chip" in r:
        lines.append(f"  optimal time per call {r['optimal_seconds'] * 1e3:.2f} ms -> "
                     f"{r['images_per_s_per_chip']:.1f} images/s/chip"
                     + (f", roofline MFU {r['roofline_mfu']:.1%}" if "roofline_mfu" in r else "")
                     + (" (its FLOPs count what the custom kernels recompute: flash attention's backward "
                        "recomputes the attention logits)" if "roofline_mfu" in r and "tpu_custom_call" in
                        r["custom_kernels"] and r["what"].startswith("train") else ""))
    else:
        lines.append(f"  optimal time per call: none from the compiler (optimal_seconds={r.get('optimal_seconds')})")
    if "cost_from" in r:
        lines.append(f"  cost from {r['cost_from']}")
    lines.append(f"  custom kernels: {', '.join(r['custom_kernels']) or 'none'}")
    if "train_state_gib" in r:
        lines.append(f"  train state (params, EMA, optimizer; all chips): {r['train_state_gib']:.3f} GiB for "
                     f"{r['trained_parameters']:,} trained parameters")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    tune_gc(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a latent-diffusion config's name or path, optionally :VARIANT (txt2img: or "
                                    "none, with --preset)")
    p.add_argument("--preset", choices=sorted(presets.PRESETS), help="the architecture, for configs that read it from "
                                                               "`pretrained`")
    p.add_argument("--topology", default="host", help=f"host, or a TPU slice: {', '.join(TOPOLOGIES)}")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: this many slices (over DCN)")
    p.add_argument("--per-chip-batch", type=int, default=8)
    p.add_argument("--what", choices=("train", "txt2img", "both", "eval"), default="train",
                   help="eval: the train step, and the config's in-training evaluation (generation, Inception, CLIP) "
                        "with its cost per MLPerf evaluation and share of the run")
    p.add_argument("--steps", type=int, default=50, help="txt2img: sampler steps")
    p.add_argument("--sampler", default="ddim", help="txt2img: the sampler (ddim, dpm++2m, euler, euler_a)")
    p.add_argument("--size", type=int, default=None, help="txt2img: the image side (default: the model's native)")
    p.add_argument("--dtype", default="bfloat16", help="txt2img compute dtype")
    p.add_argument("--attention", choices=ATTENTION, default="auto",
                   help="txt2img attention (train: --set train.attention=...); auto: the platform's fused kernel")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.remat=True (repeatable)")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--hlo", help="also write the compiled train step's HLO text here (for benchmarks.hlo_ops)")
    args = p.parse_args(argv)
    if args.hlo and args.what == "txt2img":
        p.error("--hlo writes the train step's HLO: use it with --what train, both or eval")
    if args.config is None and (args.what != "txt2img" or not args.preset):
        p.error("--config is needed (--what txt2img takes --preset alone, e.g. --preset sdxl)")
    config = None if args.config is None else configs_lib.load(args.config)
    if config is None and args.set:
        p.error("--set overrides a config's values: give --config")
    for kv in args.set:
        key, value = kv.split("=", 1)
        configs_lib.check_override(config, key)
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value
    devices, chip = topology_devices(args.topology, args.num_slices)
    print(f"{args.topology}: {len(devices)} devices ({devices[0].device_kind})", flush=True)
    reports = []
    if args.what in ("train", "both", "eval"):
        t0 = time.perf_counter()
        compiled, batch, run = compile_train(config, devices, args.per_chip_batch, args.preset)
        reports.append(report(compiled, args.per_chip_batch, chip, f"train step, global batch {batch}",
                              time.perf_counter() - t0, hlo_path=args.hlo))
        reports[-1].update(state_sizes(run))
        print(format_report(reports[-1]), flush=True)
    if args.what in ("txt2img", "both"):
        reports.append(txt2img_report(txt2img_configs(config, args.preset), devices, chip, args))
        print(format_report(reports[-1]), flush=True)
    if args.what == "eval":
        for r in eval_report(config, devices, chip, args, reports[0]):
            reports.append(r)
            print(format_report(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"topology": args.topology, "config": args.config, "preset": args.preset, "reports": reports},
                      f, indent=2)
    return reports


if __name__ == "__main__":
    main()
