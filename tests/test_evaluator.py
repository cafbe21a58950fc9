"""``sdjax-eval generate``: a model's own images measured as MLPerf measures them, checked against
pytorch-fid and open_clip (random judges in their own architectures, ``tests/eval_reference.py``)
on the same float images, drawn again in batches of another size."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from sdjax import sharding
from sdjax.checkpoints.load import load_inception
from sdjax.evaluation import fid
from sdjax.evaluation.captions import Caption
from sdjax.evaluation.evaluator import Evaluator, Judges, Protocol
from sdjax.stable_diffusion import StableDiffusion
from tests import tiny_models
from tests.helpers import ROOT, free_port, logs_tail, readme_block, subprocess_env

CLIP_CONFIG = {"embed_dim": 24,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
CAPTIONS = ["a red circle", "two green squares", "a blue triangle on red", "a cat", "an empty room"]
IDS = ["391895", "522418", "184613", "318219", "554625"]


def _reference(*args) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "eval_reference.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def judges(tmp_path_factory) -> dict[str, Path]:
    """Random judges as files, by the names the docs give them: pytorch-fid's Inception (.pth and
    .safetensors), a small open_clip model (.bin, .safetensors and its config), open_clip's vocabulary,
    and reference statistics (a well-conditioned 2048-d Gaussian, so FID does not magnify round-off)."""
    d = tmp_path_factory.mktemp("judges")
    (d / "clip.json").write_text(json.dumps(CLIP_CONFIG))
    _reference("weights", 0, d / "inception", "+", "clip-model", d / "clip.json", 0, d / "clip")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 2048)) / 2048 ** 0.5
    fid.Statistics(rng.normal(size=2048), a @ a.T + 0.1 * np.eye(2048)).save(str(d / "ref.npz"))
    return {"pt_inception-2015-12-05-6726825d.pth": d / "inception.pth", "inception": d / "inception.safetensors",
            "open_clip_pytorch_model.bin": d / "clip.bin", "clip": d / "clip.safetensors", "clip.json": d / "clip.json",
            "val2014_30k_stats.npz": d / "ref.npz",
            "bpe_simple_vocab_16e6.txt.gz": next((Path(sys.prefix) / "eval-reference" / "open_clip").glob(
                "bpe_simple_vocab_16e6.txt.gz"))}


def _write_tsv(path: Path, ids: list[str], captions: list[str]) -> Path:
    """Captions as MLPerf's val2014_30k.tsv lays them out."""
    rows = "".join(f"{i}\t{9000 + n}\t{c}\n" for n, (i, c) in enumerate(zip(ids, captions)))
    path.write_text("id\timage_id\tcaption\n" + rows)
    return path


@pytest.mark.slow
def test_readme_generate_command_on_two_hosts_equals_pytorch_fid_and_open_clip(judges, tmp_path):
    """The README's command (docs/evaluation.md's is the same) as a pod runs it, on two processes of two
    devices each: a tiny SD 1 folder, 5 captions of an MLPerf-style TSV in global batches of 4 (the
    last one padded, its one caption on process 0 and none on process 1). Statistics, FID, CLIP score
    and PNGs as the references compute them from the same captions' images drawn in one process, in
    one padded batch of 8."""
    model = tiny_models.save_pipeline(tmp_path / "sd1", "sd1", seed=0)
    [command] = readme_block("## Evaluate")
    assert command == ".venv/bin/" + readme_block("## A model's FID and CLIP score", "docs/evaluation.md")[0]
    names = dict(judges, **{"CKPT": model, "val2014_30k.tsv": _write_tsv(tmp_path / "captions.tsv", IDS, CAPTIONS),
                            "samples/": tmp_path / "samples", "samples.npz": tmp_path / "samples.npz"})
    argv = [str(names.get(a, a)) for a in shlex.split(command)]
    argv[0] = os.path.join(os.path.dirname(sys.executable), os.path.basename(argv[0]))
    argv += ["--clip-config", str(judges["clip.json"]), "--size", "32", "--steps", "3", "--batch-size", "4"]
    port, logs = free_port(), [(tmp_path / f"host{i}.out", tmp_path / f"host{i}.err") for i in range(2)]
    files = [(open(out, "w"), open(err, "w")) for out, err in logs]
    procs = [subprocess.Popen(argv, stdout=files[i][0], stderr=files[i][1], env=subprocess_env(
        2, SDJAX_COORDINATOR=f"localhost:{port}", SDJAX_NUM_PROCESSES="2", SDJAX_PROCESS_ID=str(i))) for i in range(2)]
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p, pair in zip(procs, files):
            p.kill()
            for f in pair:
                f.close()
    out = [o.read_text() for o, _ in logs]
    assert codes == [0, 0], logs_tail([o + e.read_text() for o, (_, e) in zip(out, logs)])
    *_, count, fid_line, clip_line = out[0].strip().splitlines()
    assert count == "measured 5 images" and fid_line.startswith("FID: ") and clip_line.startswith("CLIP score: ")
    assert "FID: " not in out[1]  # one host reports

    # The same captions' images, drawn in one batch of 8 (3 padded) on 4 devices.
    sd = StableDiffusion.from_pretrained(str(model))
    evaluator = Evaluator.of(sd, Protocol(steps=3, size=32, batch_size=8),
                             Judges(load_inception(str(judges["inception"])),
                                    fid.Statistics.load(str(judges["val2014_30k_stats.npz"]))),
                             mesh=sharding.data_mesh(jax.devices()[:4]))
    images = np.asarray(evaluator.images(evaluator.replicated(sd.params), CAPTIONS, 0, sd.scaling_factor))[:5]
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS))
    _reference("features", judges["inception"], tmp_path / "images.npy", tmp_path / "features.npy",
               "+", "clip-cosines", judges["clip.json"], judges["clip"], tmp_path / "images.npy",
               tmp_path / "captions.txt", tmp_path / "cosines.npy")
    features = np.load(tmp_path / "features.npy").astype(np.float64)
    mu, sigma = np.mean(features, axis=0), np.cov(features, rowvar=False)  # pytorch-fid's statistics

    got = fid.Statistics.load(str(tmp_path / "samples.npz"))
    np.testing.assert_allclose(got.mu, mu, rtol=0, atol=1e-4 * np.abs(mu).max())
    np.testing.assert_allclose(got.sigma, sigma, rtol=0, atol=2e-4 * np.abs(sigma).max())
    want_fid = float(_reference("frechet", tmp_path / "samples.npz", judges["val2014_30k_stats.npz"]))
    assert float(fid_line.split()[-1]) == pytest.approx(want_fid, rel=1e-6)
    cosines = np.load(tmp_path / "cosines.npy").astype(np.float64)
    assert float(clip_line.split()[-1]) == pytest.approx(float(np.mean(cosines)), abs=1e-5)

    meta = [json.loads(line) for line in (tmp_path / "samples" / "metadata.jsonl").read_text().splitlines()]
    assert meta == [{"file_name": f"{i}.png", "text": c} for i, c in zip(IDS, CAPTIONS)]
    assert sorted(os.listdir(tmp_path / "samples")) == sorted([f"{i}.png" for i in IDS] + ["metadata.jsonl"])
    for i, image in zip(IDS, images):
        png = np.asarray(Image.open(tmp_path / "samples" / f"{i}.png"), np.int32)
        assert np.abs(png - np.round(image * 255)).max() <= 1, i


@pytest.mark.slow
def test_docs_training_eval_logs_stops_at_its_target_and_equals_the_export_measured(judges, shapes_data_dir,
                                                                                     tmp_path):
    """docs/evaluation.md's training command on the tiny config (4 steps, eval every 2 with a CLIP
    target every score reaches): both figures logged at step 2, the run checkpointed, exported and
    ended there, and the figures equal to the evaluator's measurement of the export (the EMA weights
    and the trained latent scale)."""
    captions = ["a red circle on a blue background", "a green square on a yellow background",
                "a blue triangle on a red background", "a yellow circle on a green background"]  # tiny's words
    [command] = readme_block("## In training", "docs/evaluation.md")
    names = dict(judges, **{"val2014_30k.tsv": _write_tsv(tmp_path / "captions.tsv", IDS[:4], captions)})
    changed = {"--config.eval.every": "2", "--config.eval.target_clip": "-1"}  # every cosine is >= -1
    argv = []
    for a in shlex.split(command):
        key, eq, value = a.partition("=")
        argv.append(f"{key}={changed.get(key, names.get(value, value))}" if eq else a)
    argv += ["--config.eval.steps=2", "--config.eval.batch_size=4", f"--config.eval.clip_config={judges['clip.json']}",
             f"--config.data.data_dir={shapes_data_dir}", "--config.data.num_examples=64", "--config.train.steps=4",
             "--config.train.batch_size=8", "--config.train.checkpoint_every=4", "--config.train.sample_every=0",
             "--config.train.log_every=1", "--config.train.fast_compile=True"]
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), argv[0]), *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, env=subprocess_env(1), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stopping at step 2 of 4" in done.stdout and "every target reached" in done.stdout
    assert sorted(os.listdir(tmp_path / "runs" / "ldm" / "checkpoints")) == ["2"]
    logged = [json.loads(line) for line in (tmp_path / "runs" / "ldm" / "metrics.jsonl").read_text().splitlines()]
    [scores] = [m for m in logged if "eval/fid" in m]
    assert scores["step"] == 2 and set(scores) == {"step", "eval/fid", "eval/clip_score"}

    sd = StableDiffusion.from_pretrained(str(tmp_path / "runs" / "ldm-export"))
    evaluator = Evaluator.of(sd, Protocol(steps=2, size=32, batch_size=4), Judges.load(
        inception=str(judges["inception"]), ref_stats=str(judges["val2014_30k_stats.npz"]), clip=str(judges["clip"]),
        clip_config=str(judges["clip.json"]), clip_tokenizer=str(judges["bpe_simple_vocab_16e6.txt.gz"])),
        mesh=sharding.data_mesh(jax.devices()[:1]))
    want = evaluator(evaluator.replicated(sd.params), [Caption(i, c) for i, c in zip(IDS, captions)], sd.scaling_factor)
    assert scores["eval/fid"] == pytest.approx(want.fid, rel=1e-4)
    assert scores["eval/clip_score"] == pytest.approx(want.clip_score, abs=1e-4)


def test_generate_errors_name_the_problem(tmp_path, capsys):
    from sdjax.cli.evaluate import main

    (tmp_path / "ok.tsv").write_text("id\tcaption\n1\ta cat\n")
    (tmp_path / "no-caption.tsv").write_text("id\ttext\n1\ta cat\n")
    (tmp_path / "repeated.tsv").write_text("id\tcaption\n1\ta cat\n1\ta dog\n")
    base = ["generate", "--checkpoint", str(tmp_path / "model")]
    for args, message in [
            (["--captions", str(tmp_path / "ok.tsv"), "--ref-stats", "r.npz"], "both --ref-stats"),
            (["--captions", str(tmp_path / "ok.tsv"), "--clip", "c.bin"], "both --clip"),
            (["--captions", str(tmp_path / "ok.tsv")], "nothing to measure"),
            (["--captions", str(tmp_path / "no-caption.tsv"), "--clip", "c", "--clip-tokenizer", "t"],
             "'caption' column"),
            (["--captions", str(tmp_path / "repeated.tsv"), "--clip", "c", "--clip-tokenizer", "t"], "ids repeat (1)"),
            (["--captions", str(tmp_path / "missing.tsv"), "--clip", "c", "--clip-tokenizer", "t"],
             "no such caption file"),
            (["--captions", str(tmp_path / "ok.tsv"), "--clip", str(tmp_path / "missing.bin"), "--clip-tokenizer", "t"],
             "missing.bin")]:
        with pytest.raises(SystemExit) as e:
            main(base + args)
        assert e.value.code == 2 and message in capsys.readouterr().err, args
