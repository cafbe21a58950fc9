"""FID against pytorch-fid: its Inception (``fid_inception_v3``, random weights in its own
architecture, built without its download), its statistics files and its Frechet distance."""

import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file
from scipy import linalg

from sdjax.checkpoints.errors import CheckpointError
from sdjax.checkpoints.load import load_inception
from sdjax.evaluation import fid
from sdjax.evaluation.features import InceptionFeatures
from tests.helpers import ROOT, readme_block, subprocess_env


def _reference(*args: str) -> str:
    """pytorch-fid in its own process (``tests/eval_reference.py``); returns what it printed."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "eval_reference.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """Random weights in pytorch-fid's Inception (a .safetensors and the same as a .pth), and two
    512 px images with the reference's features of them."""
    d = tmp_path_factory.mktemp("inception")
    images = np.random.default_rng(0).random((2, 512, 512, 3), np.float32)
    np.save(d / "images.npy", images)
    _reference("weights", 0, d / "inception", "+", "features", d / "inception.safetensors", d / "images.npy",
               d / "features.npy")
    return d / "inception.safetensors", d / "inception.pth", images, np.load(d / "features.npy")


def test_features_match_pytorch_fid_on_512px_images(inception):
    weights, pickle, images, want = inception
    got = InceptionFeatures(load_inception(str(weights)), batch_size=2)(images)
    assert got.shape == (2, 2048)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # The .pth pickle reads only with the opt-in, into the same weights.
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_inception(str(pickle))
    from_pickle = load_inception(str(pickle), allow_pickle=True)
    np.testing.assert_array_equal(from_pickle["Mixed_7c"]["branch_pool"]["bn"]["running_var"],
                                  load_inception(str(weights))["Mixed_7c"]["branch_pool"]["bn"]["running_var"])


def test_malformed_weights_are_refused(tmp_path, inception):
    weights = inception[0]
    state = load_file(str(weights))
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    state["Mixed_5b.branch1x1.bn.running_mean"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "bad.safetensors"))
    names = r"(?s)Mixed_6b/branch7x7_2/conv/kernel.*Mixed_5b.branch1x1.bn.running_mean"
    with pytest.raises(CheckpointError, match=names):
        load_inception(str(tmp_path / "bad.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_inception(str(tmp_path / "cut.safetensors"))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        load_inception(str(tmp_path / "missing.pth"))


def _well_conditioned(rng, d: int, n: int) -> fid.Statistics:
    f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / d ** 0.5 + rng.normal(size=d)
    return fid.Statistics.of(f)


def test_frechet_distance_matches_pytorch_fid(tmp_path):
    rng = np.random.default_rng(0)
    a, b = _well_conditioned(rng, 64, 500), _well_conditioned(rng, 64, 500)
    a.save(str(tmp_path / "a.npz"))
    b.save(str(tmp_path / "b.npz"))
    want = float(_reference("frechet", tmp_path / "a.npz", tmp_path / "b.npz"))
    assert fid.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    # Closed form for commuting covariances: ||mu_a - mu_b||^2 + sum (sqrt(s_a) - sqrt(s_b))^2.
    s1, s2 = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    c, d = fid.Statistics(np.zeros(16), np.diag(s1)), fid.Statistics(np.ones(16), np.diag(s2))
    assert fid.frechet_distance(c, d) == pytest.approx(16 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2), rel=1e-9)
    assert fid.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    # Singular covariances (32 samples in 256 dimensions): pytorch-fid's formula, with scipy's sqrtm, here.
    e, f = (fid.Statistics.of(rng.normal(size=(32, 256)) + shift) for shift in (0.0, 0.5))
    sqrtm = linalg.sqrtm(e.sigma @ f.sigma).real
    want = np.sum((e.mu - f.mu) ** 2) + np.trace(e.sigma) + np.trace(f.sigma) - 2 * np.trace(sqrtm)
    # rel 1e-6: a 1e-15 relative change of a singular covariance moves the distance by up to 6e-9 (the
    # square roots of its round-off-sized eigenvalues), so another CPU's rounding may move it that much.
    assert fid.frechet_distance(e, f) == pytest.approx(want, rel=1e-6)


def test_frechet_distance_refuses_what_is_not_a_covariance():
    c = fid.Statistics(np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(c, fid.Statistics(np.zeros(4), -np.eye(4)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        fid.frechet_distance(c, fid.Statistics(np.full(4, np.nan), np.eye(4)))


def test_statistics_files_are_pytorch_fids_format(tmp_path):
    rng = np.random.default_rng(1)
    stats = _well_conditioned(rng, 8, 20)
    stats.save(str(tmp_path / "s.npz"))
    with np.load(tmp_path / "s.npz") as f:  # what pytorch-fid's compute_statistics_of_path reads
        np.testing.assert_array_equal(f["mu"], stats.mu)
        np.testing.assert_array_equal(f["sigma"], stats.sigma)
    np.savez(tmp_path / "other.npz", mean=stats.mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.Statistics.load(str(tmp_path / "other.npz"))
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"x": 1}], dtype=object), sigma=stats.sigma)
    with pytest.raises(ValueError, match="not a readable FID statistics"):
        fid.Statistics.load(str(tmp_path / "pickled.npz"))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable FID statistics"):
        fid.Statistics.load(str(tmp_path / "cut.npz"))


def _write_folder(folder, n: int, seed: int, size=(96, 128)) -> None:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def _eval(*args: str) -> subprocess.CompletedProcess:
    """A ``sdjax-eval`` command line through the installed console script."""
    script = os.path.join(os.path.dirname(sys.executable), args[0])
    return subprocess.run([script, *args[1:]], capture_output=True, text=True, env=subprocess_env(2), timeout=600)


def _printed(done: subprocess.CompletedProcess) -> float:
    """The figure on a command's last line."""
    return float(done.stdout.strip().splitlines()[-1].split()[-1])


def test_cli_stats_and_fid_equal_pytorch_fid(inception, tmp_path):
    """``sdjax-eval stats`` equals ``pytorch_fid --save-stats`` on the same folder (one corrupt file
    skipped and counted), and ``sdjax-eval fid`` between a folder and a statistics file equals
    pytorch-fid's distance between the two."""
    weights, pickle = inception[:2]
    _write_folder(tmp_path / "a", 6, 0)
    _write_folder(tmp_path / "b", 5, 1)
    rng = np.random.default_rng(2)  # and two well-conditioned statistics files
    for name in ("c", "d"):
        _well_conditioned(rng, 64, 500).save(str(tmp_path / f"{name}.npz"))
    printed = _reference("stats", weights, tmp_path / "a", tmp_path / "want_a.npz", "+",
                         "stats", weights, tmp_path / "b", tmp_path / "want_b.npz", "+",
                         "frechet", tmp_path / "want_a.npz", tmp_path / "want_b.npz", "+",
                         "frechet", tmp_path / "c.npz", tmp_path / "d.npz").split()
    want = {name: fid.Statistics.load(str(tmp_path / f"want_{name}.npz")) for name in ("a", "b")}
    want_fid, want_cd = float(printed[-2]), float(printed[-1])
    (tmp_path / "a" / "zz-corrupt.png").write_bytes(b"not an image")

    # docs/evaluation.md's two commands, with this test's folders and weights for its file names
    names = {"coco-val2014-30k/": tmp_path / "a", "val2014_30k_stats.npz": tmp_path / "a.npz",
             "samples/": tmp_path / "b", "pt_inception-2015-12-05-6726825d.pth": pickle}
    stats_cmd, fid_cmd = ([str(names.get(a, a)) for a in shlex.split(c)] + ["--batch-size", "4"]
                          for c in readme_block("## FID", "docs/evaluation.md"))
    done = _eval(*stats_cmd)
    assert stats_cmd[:2] == ["sdjax-eval", "stats"] and done.returncode == 0, done.stderr[-3000:]
    assert "skipped 1 images that do not decode: zz-corrupt.png" in done.stderr
    got = fid.Statistics.load(str(tmp_path / "a.npz"))
    np.testing.assert_allclose(got.mu, want["a"].mu, rtol=0, atol=1e-4 * np.abs(want["a"].mu).max())
    np.testing.assert_allclose(got.sigma, want["a"].sigma, rtol=0, atol=2e-4 * np.abs(want["a"].sigma).max())

    done = _eval(*fid_cmd)  # the samples' folder against the statistics just written
    assert fid_cmd[:2] == ["sdjax-eval", "fid"] and done.returncode == 0, done.stderr[-3000:]
    # A handful of images in 2048 dimensions: singular covariances, whose square root magnifies
    # the features' round-off; the distance agrees to 1e-2 where the statistics agree to 1e-4.
    assert _printed(done) == pytest.approx(want_fid, rel=1e-2)
    done = _eval("sdjax-eval", "fid", str(tmp_path / "c.npz"), str(tmp_path / "d.npz"))  # well-conditioned: 1e-6
    assert done.returncode == 0, done.stderr[-3000:]
    assert _printed(done) == pytest.approx(want_cd, rel=1e-6)


def test_cli_errors_name_the_problem(inception, tmp_path, capsys):
    from sdjax.cli.evaluate import main

    weights, pickle = inception[:2]
    _write_folder(tmp_path / "a", 1, 0)
    (tmp_path / "a.npz").write_bytes(b"")
    for args, message in [(("stats", tmp_path / "a", tmp_path / "a.npz", "--inception", weights), "exists"),
                          (("stats", tmp_path / "a", tmp_path / "a.txt", "--inception", weights), "end in .npz"),
                          (("fid", tmp_path / "a", tmp_path / "a.npz"), "--inception"),
                          (("fid", tmp_path / "nowhere", tmp_path / "a.npz"), "neither a folder"),
                          (("fid", tmp_path / "a.npz", tmp_path / "a.npz"), "not a readable FID statistics"),
                          (("stats", tmp_path / "a", tmp_path / "new.npz", "--inception", pickle), "allow_pickle")]:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        assert e.value.code == 2 and message in capsys.readouterr().err, args
