"""Hub ids resolved offline from a cache in huggingface_hub's own layout."""

import os
import shutil

import jax
import numpy as np
import pytest

import tiny_models
from sdjax.checkpoints import hub
from sdjax.stable_diffusion import StableDiffusion

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo: str, files_from) -> str:
    """``files_from``'s tree as revision ``main`` of ``repo`` in a hub cache, laid out as huggingface_hub
    writes it (blobs behind snapshot links are an optimisation it does not require)."""
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files_from, base / "snapshots" / COMMIT)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    return str(base / "snapshots" / COMMIT)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_hub_ids_resolve_offline_and_local_folders_win(cache, tmp_path, monkeypatch):
    folder = tiny_models.save_pipeline(tmp_path / "pipe", "sd1", seed=3)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle sdjax must not fetch")
    snapshot = _cache_repo(cache, "org/tiny-sd", folder)
    sd = StableDiffusion.from_pretrained("org/tiny-sd")
    want = StableDiffusion.from_pretrained(str(folder))
    for a, b in zip(jax.tree.leaves(sd.params), jax.tree.leaves(want.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert hub.resolve("org/tiny-sd@main", "checkpoint") == snapshot
    from sdjax.cli import sample as sample_cli
    written = sample_cli.main(["--checkpoint", "org/tiny-sd", "--prompt", "a cat", "--steps", "1", "--H", "16",
                               "--W", "16", "--n-samples", "1", "--out", str(tmp_path / "out")])
    assert len(written) == 2 and os.path.isfile(written[0])
    assert hub.resolve("org/tiny-sd", "checkpoint", revision=COMMIT) == snapshot

    with pytest.raises(ValueError, match="is a PyTorch pickle; pass allow_pickle=True"):
        hub.resolve("org/tiny-sd/unet/diffusion_pytorch_model.bin", "checkpoint")

    # A local folder of the same name wins.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    shutil.copytree(folder, tmp_path / "org" / "tiny-sd")
    assert hub.resolve("org/tiny-sd", "checkpoint") == "org/tiny-sd"

    with pytest.raises(FileNotFoundError, match=r"org/missing: no such local path, and not a hub model sdjax could "
                                                r"fetch \(HF_HUB_OFFLINE is set"):
        StableDiffusion.from_pretrained("org/missing")
    assert not hub.is_hub_id("gs://b/m") and not hub.is_hub_id("a/b/c") and hub.is_hub_id("a/b/c.safetensors")


def test_only_what_sdjax_reads_is_asked_for():
    fetched = hub._patterns("pipeline", "fp16", allow_pickle=False)
    import fnmatch
    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.bin",
             "text_encoder/model.fp16.safetensors", "tokenizer/vocab.json", "v1-5-pruned.safetensors",
             "scheduler/scheduler_config.json", "safety_checker/model.fp16.safetensors"]
    taken = [f for f in files if any(fnmatch.fnmatch(f, p) for p in fetched)]
    assert taken == ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                     "text_encoder/model.fp16.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"]
    assert os.path.basename(hub.KINDS["autoencoder"][0]) == "config.json"
