"""CLIP score against open_clip: a small random open_clip model (its own classes, from a config
dict), its evaluation transform and tokenizer, run in a process of its own (``tests/eval_reference.py``)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from sdjax.checkpoints.errors import CheckpointError
from sdjax.checkpoints.open_clip import load_clip
from sdjax.evaluation import clip_score
from sdjax.models.clip import CLIPConfig
from tests.helpers import ROOT, readme_block, subprocess_env

CONFIG = {"embed_dim": 24,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
CAPTIONS = ["a red circle on a blue background", "two green squares", "a photo of a cat", "an empty room"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(weights .safetensors, .bin, the images, open_clip's token ids and cosines)."""
    d = tmp_path_factory.mktemp("clip")
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "captions.txt").write_text("\n".join(CAPTIONS))
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(40, 48), (48, 40), (32, 32), (64, 50)]):  # wide, tall, exact, larger
        images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        Image.fromarray(images[-1]).save(d / "images" / f"{i}.png")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "eval_reference.py"), "clip", str(d / "config.json"),
                           "0", str(d / "clip"), str(d / "images"), str(d / "captions.txt")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(d / "clip.npz") as f:
        return d / "clip.safetensors", d / "clip.bin", images, f["ids"], f["cosines"]


def test_cosines_match_open_clip(reference):
    weights, pickle, images, ids, want = reference
    config = CLIPConfig.from_open_clip(CONFIG)
    scorer = clip_score.CLIPScorer(load_clip(str(weights), config), config)
    got = scorer.cosines(images, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert clip_score.score(got) == pytest.approx(float(np.mean(want.astype(np.float64))), abs=1e-5)
    assert clip_score.score(np.asarray([-0.2, 0.1])) == pytest.approx(-0.05)
    assert clip_score.score(np.asarray([-0.2, 0.1]), torchmetrics=True) == 0.0
    assert clip_score.score(np.asarray([0.3, 0.1]), torchmetrics=True) == pytest.approx(20.0)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_clip(str(pickle), config)
    from_pickle = load_clip(str(pickle), config, allow_pickle=True)
    np.testing.assert_array_equal(from_pickle["visual_projection"]["kernel"],
                                  load_clip(str(weights), config)["visual_projection"]["kernel"])


def test_float_images_truncate_to_uint8_as_mlperf():
    rng = np.random.default_rng(1)
    x = rng.random((40, 48, 3), np.float32)
    np.testing.assert_array_equal(clip_score.preprocess(x, 32),
                                  clip_score.preprocess((x * 255).astype(np.uint8), 32))
    assert not np.array_equal(clip_score.preprocess(x, 32),
                              clip_score.preprocess(np.round(x * 255).astype(np.uint8), 32))


def test_a_config_that_does_not_match_the_file_names_the_tensors(reference, tmp_path):
    weights = reference[0]
    wrong = CLIPConfig.from_open_clip(dict(CONFIG, embed_dim=16))
    with pytest.raises(CheckpointError, match="visual_projection"):
        load_clip(str(weights), wrong)
    state = load_file(str(weights))
    del state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match="vision_model/encoder/layers_1/self_attn/q_proj/kernel"):
        load_clip(str(tmp_path / "cut.safetensors"), CLIPConfig.from_open_clip(CONFIG))
    with pytest.raises(ValueError, match="ViT image towers"):
        CLIPConfig.from_open_clip({"embed_dim": 8, "vision_cfg": {"layers": [3, 4, 6, 3], "width": 64}})


def test_docs_clip_command_equals_open_clip(reference, tmp_path):
    """docs/evaluation.md's ``sdjax-eval clip`` on a captioned folder (one entry's image corrupt:
    skipped and counted), with open_clip's own vocabulary file: the token ids equal open_clip's and
    the printed score is the mean of open_clip's cosines."""
    from sdjax.tokenizer import load_tokenizer, tokenize

    weights, pickle, images, ids, cosines = reference
    bpe = next((Path(sys.prefix) / "eval-reference" / "open_clip").glob("bpe_simple_vocab_16e6.txt.gz"))
    np.testing.assert_array_equal(tokenize(load_tokenizer(bpe), CAPTIONS), ids)
    folder = tmp_path / "samples"
    folder.mkdir()
    entries = []
    for i, (image, caption) in enumerate(zip(images, CAPTIONS)):
        Image.fromarray(image).save(folder / f"{i}.png")
        entries.append({"file_name": f"{i}.png", "text": caption})
    (folder / "bad.png").write_bytes(b"not an image")
    entries.append({"file_name": "bad.png", "text": "a caption without its image"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (tmp_path / "ViT-tiny.json").write_text(json.dumps(CONFIG))
    [command] = readme_block("## CLIP score", "docs/evaluation.md")
    names = {"samples/": folder, "open_clip_pytorch_model.bin": pickle, "bpe_simple_vocab_16e6.txt.gz": bpe}
    argv = [str(names.get(a, a)) for a in shlex.split(command)] + ["--clip-config", str(tmp_path / "ViT-tiny.json")]
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), argv[0]), *argv[1:]], capture_output=True,
                          text=True, env=subprocess_env(2), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped 1 images that do not decode: bad.png" in done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("CLIP score: ")
    assert float(last.split()[-1]) == pytest.approx(float(np.mean(cosines.astype(np.float64))), abs=1e-5)


def test_clip_command_errors_name_the_problem(reference, tmp_path, capsys):
    from sdjax.cli.evaluate import main

    weights = reference[0]
    (tmp_path / "no-meta").mkdir()
    (tmp_path / "bad-meta").mkdir()
    (tmp_path / "bad-meta" / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "ok"}\n{"file": "1.png"}\n')
    for folder, message in [("no-meta", "metadata.jsonl: no such file"), ("bad-meta", "line 2: expected")]:
        with pytest.raises(SystemExit) as e:
            main(["clip", str(tmp_path / folder), "--clip", str(weights), "--tokenizer", str(tmp_path)])
        assert e.value.code == 2 and message in capsys.readouterr().err, folder
