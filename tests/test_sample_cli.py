"""The sampling command lines, run in-process on a tiny diffusers folder."""

import json

import numpy as np
import pytest
from PIL import Image

from sdjax import sample_cli
from tests import tiny_models


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_models.save_pipeline(tmp_path_factory.mktemp("cli") / "pipe", "sd1", seed=4)


def test_txt2img_then_img2img_write_images_sidecars_and_grids(folder, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n../../etc/passwd\n")
    common = ["--checkpoint", str(folder), "--steps", "2", "--H", "16", "--W", "16", "--n-samples", "2",
              "--out", str(out), "--compile-cache", str(tmp_path / "cache")]
    first = sample_cli.main(common + ["--from-file", str(prompts), "--n-iter", "1", "--seed", "3"])
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert len(pngs) == 4 and len(first) == 5
    assert all("/" not in n and ".." not in n for n in pngs)
    meta = json.loads((out / pngs[2].replace(".png", ".json")).read_text())
    assert meta["prompt"] == "../../etc/passwd" and meta["seed"] == 4 and meta["steps"] == 2
    assert Image.open(out / "grid-0000.png").size == (2 * 16, 2 * 16)
    # the sidecar reproduces its image
    from sdjax.stable_diffusion import StableDiffusion
    again = StableDiffusion.from_pretrained(folder).txt2img(
        [meta["prompt"]] * meta["batch_size"], steps=2, height=16, width=16, seed=meta["seed"])
    np.testing.assert_array_equal(again[meta["index_in_batch"]], np.asarray(Image.open(out / pngs[2])))

    second = sample_cli.main(common + ["--init-img", str(out / pngs[0]), "--prompt", "a blue square",
                                       "--strength", "0.5"], img2img=True)
    assert sorted(p.name for p in out.glob("0*.png"))[:4] == pngs  # nothing overwritten
    assert len(list(out.glob("0*.png"))) == 6 and (out / "grid-0001.png").exists()
    assert json.loads(open(second[0].replace(".png", ".json")).read())["strength"] == 0.5


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "x", "--H", "20"], "multiple of 8"),
    (["--from-file", "/nonexistent/prompts.txt"], "no such file"),
    (["--prompt", "x", "--steps", "0"], "steps"),
])
def test_txt2img_bad_input(folder, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample_cli.main(["--checkpoint", str(folder)] + extra)
    assert message in str(e.value)


def test_img2img_bad_input(folder, tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        sample_cli.main(["--checkpoint", str(folder), "--prompt", "x", "--init-img", str(tmp_path / "no.png")],
                        img2img=True)
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    with pytest.raises(SystemExit, match="strength"):
        sample_cli.main(["--checkpoint", str(folder), "--prompt", "x", "--init-img", str(img), "--strength", "0"],
                        img2img=True)
    with pytest.raises(SystemExit):
        sample_cli.main(["--checkpoint", str(folder), "--prompt", "x", "--sampler", "plms"])


def test_safe_name_bounds_length_and_strips_separators():
    assert sample_cli.safe_name("a/b\\c d") == "a_b_c_d"
    assert sample_cli.safe_name("") == "empty"
    assert len(sample_cli.safe_name("x" * 500)) == 60
