"""The ahead-of-time report compiles the real train step and txt2img program for a TPU slice on this
CPU host (libtpu describes the slice; nothing runs on it), and the TPU flash-attention kernel
lowers for Stable Diffusion's head widths. Every test that loads libtpu lives in this file: a
process that has loaded it holds its lock file, so under pytest-xdist (one file per worker) a
second file loading it would fail."""

import json

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import hlo_ops
from sdjax import aot
from sdjax.models import layers


def test_topologies_describe_the_slices_and_refuse_unknown_names():
    assert set(aot.TOPOLOGIES) >= {"v5e-8", "v5p-8", "v6e-8", "v5p-128", "v4-8"}
    assert aot.TOPOLOGIES["v5p-8"].topology_name == "v5:2x2x1"  # 8 TensorCores = 4 megacore chips
    with pytest.raises(ValueError, match="--topology v9-8: unknown"):
        aot.topology_devices("v9-8")


@pytest.mark.slow
def test_train_and_txt2img_report_for_a_v5e_slice(tmp_path, capsys):
    out = tmp_path / "report.json"
    reports = aot.main(["--config", "tiny", "--topology", "v5e-8", "--per-chip-batch", "2", "--what", "both",
                        "--steps", "2", "--out", str(out), "--hlo", str(tmp_path / "train.hlo")])
    text = capsys.readouterr().out
    assert "v5e-8: 8 devices" in text and "compiler-estimated" in text
    assert json.loads(out.read_text())["reports"] == json.loads(json.dumps(reports))
    train, sample = reports
    assert train["what"] == "train step, global batch 16" and sample["what"].startswith("txt2img 32x32, 2 ddim steps")
    for r in reports:
        h = r["hbm_gib"]
        assert r["fits"] and 0 < h["total"] < 16
        assert h["total"] == pytest.approx(h["arguments"] + h["temporaries"] + h["outputs_not_aliased"] + h["code"])
        assert r["flops"] > 0 and r["optimal_seconds"] > 0
        assert r["images_per_s_per_chip"] == pytest.approx(2 / r["optimal_seconds"])
        assert r["roofline_mfu"] == pytest.approx(r["flops"] / (r["optimal_seconds"] * 197e12))
    assert train["hbm_gib"]["outputs_not_aliased"] < 1e-3  # the state is donated: updated in place
    assert sample["cost_from"].startswith("the 1- and 2-step programs") and "cost from the 1- and 2-step" in text
    # The train step's compiled HLO, with the TPU compiler's per-instruction cycle estimates that
    # benchmarks.hlo_ops sums by model path: the UNet's convolutions among them.
    ops = hlo_ops.ops((tmp_path / "train.hlo").read_text())
    assert any(o.kind == "matmul/conv" and o.where.startswith("up_blocks_") and o.cycles > 0 for o in ops)


def test_eval_summary_counts_padded_calls_and_the_share_of_the_run():
    """MLPerf's 30,000 captions in calls of 64 are 469 calls (the last one padded); at 0.5 + 0.1 + 0.2 s
    per call that is 375.2 s, against 512,000 training images at 100 images/s on each of 4 chips
    (1,280 s): 375.2 / 1,655.2 of the run."""
    s = aot.eval_summary({"generate": 0.5, "inception": 0.1, "clip": 0.2}, 64, 4, 512_000, 100.0)
    assert s["calls"] == 469 and s["seconds_per_eval"] == pytest.approx(375.2)
    assert s["train_seconds_between_evals"] == pytest.approx(1280.0)
    assert s["eval_share"] == pytest.approx(375.2 / 1655.2)
    text = aot.format_report(s)
    assert "eval of 30,000 captions in 469 calls of 64 images (compiler-estimated): 375 s" in text
    assert "every 512,000 training images (1280 s of training): 22.7% of the run's time" in text
    assert "eval_share" not in aot.eval_summary({"generate": 0.5}, 64, 4, 0, 100.0)  # no cadence: no share


def test_loop_cost_counts_every_step():
    """XLA's cost analysis counts a scan's body once whatever its length (checked here on the host's
    compiler); ``loop_cost`` from the 1- and 2-step programs written out gives the written-out
    n-step program's figures."""
    w = jnp.zeros((64, 64), jnp.float32)

    def flops(n, unroll):
        def f(x):
            return jax.lax.scan(lambda x, _: (jnp.tanh(x @ w), None), x, None, length=n, unroll=unroll)[0]
        return aot._first(jax.jit(f).lower(jnp.zeros((8, 64))).compile().cost_analysis())["flops"]

    per_step = 2 * 8 * 64 * 64  # one (8, 64) x (64, 64) product; tanh is not a FLOP to the cost analysis
    assert flops(10, False) == pytest.approx(per_step, rel=0.05)  # ten steps, counted as one
    assert flops(10, True) == pytest.approx(10 * per_step, rel=0.05)
    one, two = ({"flops": flops(n, True), "optimal_seconds": 0.5 + n} for n in (1, 2))
    assert aot.loop_cost(one, two, 10) == {"flops": pytest.approx(flops(10, True)), "optimal_seconds": 10.5}


@pytest.mark.parametrize("head_dim", [40, 64])
def test_flash_attention_lowers_for_tpu_and_keeps_logits_out_of_memory(head_dim):
    """Self-attention over 4096 tokens on a v5e-8 slice: with flash the compiled program holds the
    Mosaic kernel and needs a fraction of the temporaries of the einsum path (the f32 logits)."""
    devices, _ = aot.topology_devices("v5e-8")
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(8), ("data",))
    x = jax.ShapeDtypeStruct((8, 4096, 2, head_dim), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))

    def compiled(implementation):
        def f(q, k, v):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules((("batch", "data"),)):
                return layers.attention(q, k, v, implementation=implementation)
        return jax.jit(f, out_shardings=NamedSharding(mesh, P("data"))).lower(x, x, x).compile()

    flash, xla = compiled("flash"), compiled("xla")
    assert "tpu_custom_call" in aot.custom_kernels(flash.as_text())
    assert "tpu_custom_call" not in aot.custom_kernels(xla.as_text())
    assert flash.memory_analysis().temp_size_in_bytes < 0.25 * xla.memory_analysis().temp_size_in_bytes


def test_report_without_a_compiler_time_still_prints():
    """The TPU cost model can give no time (``optimal_seconds`` <= 0) for a program it still compiles
    and sizes: the report says so instead of failing, and keeps the memory figures."""
    r = {"what": "train step, global batch 32", "compile_s": 1.0, "per_chip_batch": 4, "flops": 1e12,
         "bytes_accessed": 1e9, "optimal_seconds": -1.0, "custom_kernels": [], "largest_buffers": [],
         "hbm_gib": {"arguments": 1.0, "temporaries": 2.0, "outputs_not_aliased": 0.0, "code": 0.1, "total": 3.1},
         "chip": {"hbm_gib": 16}, "fits": True}
    text = aot.format_report(r)
    assert "= 3.10 GiB of 16 GiB" in text and "none from the compiler (optimal_seconds=-1.0)" in text


@pytest.mark.slow
def test_aot_txt2img_runner_costs_written_out_steps_on_a_tiny_model(tmp_path, capsys):
    """The txt2img AOT runner compiles sdjax's program for a v5e-8 slice (libtpu, no TPU): the 2-step
    program written out costs one guided step more than the 1-step one (a tenth or more of it)."""
    import json

    from benchmarks import aot_txt2img, timing, weights

    model = weights.configs("tiny")
    model["scheduler"] = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", steps_offset=1)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(model))
    base = ["--impl", "sdjax", "--model", str(path), "--topology", "v5e:2x4", "--chip-config", "default",
            "--bounds", "2,2,1", "--per-chip-batch", "1", "--size", "64"]
    flops = {}
    for name, extra in (("one", ["--steps", "1", "--unroll"]), ("two", ["--steps", "2", "--unroll", "--hlo",
                                                                       str(tmp_path / "two.hlo")])):
        aot_txt2img.main(base + extra)
        flops[name] = timing.parse(capsys.readouterr().out)["flops"]
    assert flops["two"] - flops["one"] > 0.1 * flops["one"]
    # --hlo: the program's HLO, whose cycle estimates benchmarks.hlo_ops sums; both steps' UNet in it
    ops = hlo_ops.ops((tmp_path / "two.hlo").read_text())
    assert any(o.kind == "matmul/conv" and "up_blocks_" in o.where and o.cycles > 0 for o in ops)


def test_a_kernel_without_a_declared_cost_counts_no_flops(capsys):
    """What MaxDiffusion's figures beside sdjax's rest on (docs/benchmarks.md): the TPU compiler
    counts jax's splash kernel, which declares no cost, as no FLOPs (its program's time is its
    operands' bytes), while jax's flash forward declares the layer's 4 B N L^2 H and XLA's einsums
    count it themselves; diffusers-Flax's attention (bf16 logits, heads folded into the batch) is
    counted as about half its FLOPs, which is why that peer's programs count fewer."""
    from benchmarks import aot_attention, timing

    figures = {}
    for impl in ("splash", "flash", "xla", "diffusers"):
        with jax.default_matmul_precision("default"):  # as the runner's own process has it (conftest sets "highest")
            aot_attention.main(["--impl", impl, "--topology", "v5:2x2x1", "--chip-config", "megacore",
                                "--bounds", "2,2,1", "--per-chip-batch", "2", "--heads", "2", "--tokens", "512",
                                "--head-dim", "64"])
        figures[impl] = timing.parse(capsys.readouterr().out)
    model = figures["xla"]["model_flops"]
    assert model == 4 * 2 * 2 * 512**2 * 64
    assert figures["splash"]["flops"] < 0.01 * model
    assert figures["flash"]["flops"] >= model and figures["xla"]["flops"] >= model
    assert 0.4 * model < figures["diffusers"]["flops"] < 0.6 * model
    assert figures["splash"]["optimal_seconds"] < figures["flash"]["optimal_seconds"]
