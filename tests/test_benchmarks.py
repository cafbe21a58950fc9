"""The benchmark harness's own measurement code, on a tiny model (no peers, no SD 1.5 weights)."""

import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import run, sdjax_runner, timing, train_runner
from sdjax import StableDiffusion
from tests import tiny_models
from tests.helpers import ROOT


def test_measure_takes_the_median_after_warmup(monkeypatch):
    # Fake clock: call i takes durations[i] seconds.
    durations = [9.0, 5.0, 3.0, 1.0, 2.0]
    ticks = []
    for d in durations:
        ticks += [0.0, d]
    monkeypatch.setattr(timing, "clock", lambda: ticks.pop(0))
    synced = []
    out = timing.measure(lambda: "x", synced.append, repeats=3, warmup=2)
    assert synced == ["x"] * 5  # every call is synchronised before the clock is read
    assert out["first_call_s"] == 9.0
    assert out["times_s"] == [3.0, 1.0, 2.0]
    assert out["median_s"] == 2.0 and out["min_s"] == 1.0
    with pytest.raises(ValueError, match="repeats"):
        timing.measure(lambda: None, lambda x: x, repeats=0)


def test_result_line_survives_library_chatter(capsys):
    print("Some weights were newly initialized ...")
    timing.emit({"batch_s": 1.5, "rows": [1, 2]})
    assert timing.parse("noise\n" + capsys.readouterr().out + "\n") == {"batch_s": 1.5, "rows": [1, 2]}
    with pytest.raises(ValueError, match="BENCH_RESULT"):
        timing.parse("no result here")


def test_cost_analysis_counts_matmul_flops():
    n = 64
    a = jnp.ones((n, n), jnp.float32)
    compiled = jax.jit(lambda a, b: a @ b).lower(a, a).compile()
    assert train_runner.flops_of(compiled) == pytest.approx(2 * n**3, rel=0.01)
    mem = train_runner.memory_of(compiled)
    assert mem["argument_size"] == 2 * n * n * 4 and mem["output_size"] == n * n * 4


def test_text2img_and_overhead_on_a_tiny_model(tmp_path):
    sd = StableDiffusion.from_pretrained(tiny_models.save_pipeline(tmp_path / "pipe", "sd1"))
    steps, size = 2, 16
    t = sdjax_runner.text2img(sd, 1, steps, size, size, repeats=2)
    assert t["first_call_s"] > t["batch_s"] > 0 and len(t["times_s"]) == 2
    assert t["images_per_s"] == pytest.approx(1 / t["batch_s"])
    c = sdjax_runner.components(sd, 1, steps, size, size, repeats=2)
    assert c["ideal_s"] == pytest.approx(c["text_encoder_s"] + steps * c["unet_guided_s"] + c["vae_decode_s"])
    assert min(c.values()) > 0


def test_table_shows_ratios_and_errors():
    results = dict(
        text2img={"sd15 B=1": dict(sdjax=dict(images_per_s=3.0, batch_s=1 / 3),
                                   flax=dict(images_per_s=2.0, batch_s=0.5), torch={})},
        compile=dict(sdjax_first_call_s=10.0, flax_first_call_s=20.0, sdjax_cached_first_call_s=2.0),
        train=dict(rows=[dict(size="sd15", image_size=256, batch=1, dtype="float32", remat=False, step_s=None,
                              flops_per_step=8.5e11, memory=dict(peak_estimate=3 * 2**30, temp_size=2**30))]),
        aot={"v5p-8": dict(sdjax=dict(optimal_seconds=0.1, per_chip_batch=8, bytes_accessed=2e11, temp_bytes=2**30),
                           sdjax_xla={}, flax=dict(optimal_seconds=0.125, per_chip_batch=8))},
        **{"aot-txt2img": {"v5e-8 txt2img": dict(
            sdjax=dict(optimal_seconds=2.0, images_per_s_per_chip=4.0, runs=dict(loop=dict(compile_s=100.0))),
            flax=dict(optimal_seconds=4.0, images_per_s_per_chip=2.0, runs=dict(loop=dict(compile_s=50.0))),
            maxdiffusion=dict(optimal_seconds=5.0, images_per_s_per_chip=1.6, runs=dict(loop=dict(compile_s=40.0)))),
            "v5e-8 no time": dict(sdjax=dict(optimal_seconds=-3.0), flax=dict(optimal_seconds=-4.0))},
           "aot-train": {"sd2 base step": dict(
               sdjax=dict(optimal_seconds=0.08, images_per_s_per_chip=100.0, hbm_gib=dict(temporaries=8.0)),
               maxdiffusion=dict(optimal_seconds=0.1, images_per_s_per_chip=80.0, temp_bytes=4 * 2**30))}},
        errors={"text2img torch": "peer_torch exited with 1:\nOSError: no weights",
                "aot-txt2img flax": "aot_txt2img exited with 1:\nflax.errors.ScopeParamShapeError: For parameter "
                                    "kernel\nFor simplicity, JAX has removed its internal frames"})
    text = run.table(results)
    assert "| aot | v5p-8: images/s/chip (sdjax flash attention) | 80 | 64 | 1.25 |" in text
    assert "| aot | v5p-8: compiler-optimal step (sdjax flash attention) | 100 ms | 125 ms | 0.8 |" in text
    # aot-txt2img: beside diffusers-Flax and MaxDiffusion, a table of its own
    assert "| metric | sdjax | diffusers-Flax 0.39 | sdjax / diffusers-Flax | MaxDiffusion" in text
    assert "| images/s/chip | 4 | 2 | 2 | 1.6 | 2.5 |" in text
    assert "| compile time on this host (the loop), s | 100 | 50 | 2 | 40 | 2.5 |" in text
    assert "| compiler-optimal time per call, ms | - | - | - | - | - |" in text  # "no time": the compiler gave <= 0
    assert ("| train | sd15 256px B=1 float32 remat=False: compiled memory (args+out-alias+temp) | 3072 MiB | - | - |"
            in text)
    assert "| train | sd15 256px B=1 float32 remat=False: GFLOP/step (XLA) | 850 | - | - |" in text
    assert "| text2img | sd15 B=1: images/s | 3 | 2 | 1.5 | - | - |" in text
    assert "| compile | first call (cold) | 10 s | 20 s | 0.5 |" in text
    assert "OSError: no weights" in text
    # The error row shows the exception's own line, not JAX's note on removed frames after it.
    assert "| aot-txt2img flax | error | flax.errors.ScopeParamShapeError: For parameter kernel |" in text
    assert "| images/s/chip | 100 | 80 | 1.25 |" in text  # aot-train: beside MaxDiffusion, a table of its own
    assert "| compiler-optimal step, ms | 80 | 100 | 0.8 |" in text
    assert "| HBM temporaries per chip, GiB | 8 | 4 | 2 |" in text


# Lines in the form libtpu's compiled HLO text takes (shortened): a fused matmul, a layout copy in the
# backward pass, a loop whose body holds a fusion, a Pallas kernel (no cycle estimate) and free ops.
TPU_HLO = """HloModule jit_loss, entry_computation_layout={(bf16[8,64]{1,0})->bf16[8,64]{1,0}}

%fused_computation.1 (param_0.1: bf16[8,64], param_1.1: bf16[64,64]) -> bf16[8,64] {
  %param_0.1 = bf16[8,64]{1,0} parameter(0)
  %param_1.1 = bf16[64,64]{1,0} parameter(1)
  ROOT %convolution.1 = bf16[8,64]{1,0} convolution(%param_0.1, %param_1.1), dim_labels=bf_io->bf
}

%fused_computation.2 (param_0.2: f32[8,64]) -> f32[8,64] {
  %param_0.2 = f32[8,64]{1,0} parameter(0)
  ROOT %exponential.2 = f32[8,64]{1,0} exponential(%param_0.2)
}

%body.3 (p.3: (s32[], f32[8,64])) -> (s32[], f32[8,64]) {
  %p.3 = (s32[], f32[8,64]{1,0}) parameter(0)
  %gte.3 = f32[8,64]{1,0} get-tuple-element(%p.3), index=1
  %fusion.3 = f32[8,64]{1,0} fusion(%gte.3), kind=kLoop, calls=%fused_computation.2, \
metadata={op_name="jit(loss)/jvp(UNet)/down_blocks_0/resnets_1/norm1/exp"}, \
backend_config={"flag_configs":[],"estimated_cycles":"300"}
  ROOT %t.3 = (s32[], f32[8,64]{1,0}) tuple(%gte.3, %fusion.3)
}

ENTRY %main.9 (x.1: bf16[8,64], w.1: bf16[64,64]) -> bf16[8,64] {
  %x.1 = bf16[8,64]{1,0:T(8,128)(2,1)} parameter(0), metadata={op_name="x"}
  %w.1 = bf16[64,64]{1,0:T(8,128)(2,1)} parameter(1), metadata={op_name="w"}
  %fusion.1 = bf16[8,64]{1,0} fusion(%x.1, %w.1), kind=kOutput, calls=%fused_computation.1, \
metadata={op_name="jit(loss)/jvp(UNet)/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/dot_general"}, \
backend_config={"flag_configs":[],"estimated_cycles":"1000"}
  %copy.5 = bf16[8,64]{0,1} copy(%fusion.1), \
metadata={op_name="jit(loss)/transpose(jvp(UNet))/down_blocks_0/attentions_0/transformer_blocks_0/attn1/transpose"}, \
backend_config={"flag_configs":[],"estimated_cycles":"200"}
  %while.7 = (s32[], f32[8,64]{1,0}) while(%t.0), condition=%cond.3, body=%body.3
  %kernel.8 = bf16[8,64]{1,0} custom-call(%copy.5), custom_call_target="tpu_custom_call", \
metadata={op_name="jit(loss)/jvp(UNet)/down_blocks_0/attentions_0/transformer_blocks_0/attn1/\
jit(flash_attention)/pallas_call"}
  ROOT %bitcast.9 = bf16[8,64]{1,0} bitcast(%kernel.8)
}
"""


def test_hlo_ops_sums_the_compilers_cycle_estimates():
    from benchmarks import hlo_ops

    got = {(o.name, o.kind, o.backward, o.cycles, o.where) for o in hlo_ops.ops(TPU_HLO)}
    assert got == {
        ("fusion.1", "matmul/conv", False, 1000,
         "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/dot_general"),
        ("copy.5", "copy/transpose", True, 200, "down_blocks_0/attentions_0/transformer_blocks_0/attn1/transpose"),
        ("fusion.3", "elementwise/reduce", False, 300, "down_blocks_0/resnets_1/norm1/exp"),
    }  # the Pallas kernel has no estimate; parameters, bitcasts and tuples cost nothing
    kinds = {r["group"]: (r["cycles"], r["share"]) for r in hlo_ops.table(TPU_HLO, "kind")}
    assert kinds == {"matmul/conv": (1000, 1000 / 1500), "elementwise/reduce": (300, 300 / 1500),
                     "copy/transpose": (200, 200 / 1500)}
    by_block = {r["group"]: r["cycles"] for r in hlo_ops.table(TPU_HLO, "where", depth=2)}
    assert by_block == {"down_blocks_0/attentions_0": 1200, "down_blocks_0/resnets_1": 300}
    layers = {r["group"]: r["cycles"] for r in hlo_ops.table(TPU_HLO, "op")}
    assert layers["bwd copy/transpose: transformer_blocks_N/attn1:transpose"] == 200


def test_data_path_benchmark_reads_its_shards_into_512px_batches(tmp_path, capsys):
    from benchmarks import data_path

    out = tmp_path / "data.json"
    result = data_path.main(["--shards", "2", "--per-shard", "6", "--batch", "2", "--batches", "2", "--threads", "1",
                             "--out", str(out)])
    assert json.loads(out.read_text())["runs"][0]["threads"] == 1
    assert result["images_per_s_per_core"] > 0 and "| decode threads | images/s |" in capsys.readouterr().out
    rate = result["images_per_s_per_core"]
    assert result["v5p8_host_cores_needed"]["sd15_finetune full"] == pytest.approx(4 * 71.66 / rate)


def test_checkpoint_io_benchmark_saves_and_restores_the_same_state_with_both_handlers(tmp_path, capsys, monkeypatch):
    from benchmarks import checkpoint_io

    monkeypatch.chdir(ROOT)  # each variant runs as ``python -m benchmarks.checkpoint_io`` from the repository
    out = tmp_path / "checkpoint-io.json"
    checkpoint_io.main(["--devices", "2", "--saves", "2", "--out", str(out)])  # each restore is compared inside
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == list(checkpoint_io.VARIANTS) and result["devices"] == 2
    assert rows["sdjax"]["arrays"] == rows["orbax-default"]["arrays"] > 100
    assert all(len(r["saves_s"]) == 2 and r["restore_s"] > 0 for r in rows.values())
    assert "| handler | first save (CPU s / wall s) |" in capsys.readouterr().out
