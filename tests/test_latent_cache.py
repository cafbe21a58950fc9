"""Latent caching (``train.cache_latents``): the cache holds each example's posterior and tokens,
a step on cached latents equals the step on the images, a cache is reused only when it was made
from the same data, autoencoder and tokenizer, and encoding writes chunk by chunk and resumes."""

import jax
import numpy as np
import pytest

from sdjax.data import builder, latent_cache
from sdjax.models.autoencoder import AutoencoderKL
from sdjax.tokenizer import tokenize
from sdjax.training import latent, latent_step
from tests.helpers import latent_config


def _one_device_config(shapes_data_dir: str, **train):
    c = latent_config(shapes_data_dir)
    c.mesh.shape = (1, 1)
    c.train.update(train)
    return c


@pytest.fixture(scope="module")
def cached(shapes_data_dir, tmp_path_factory):
    """A one-device setup training from cached latents, and its cache."""
    c = _one_device_config(shapes_data_dir, cache_latents=True, latent_cache_dir=str(tmp_path_factory.mktemp("cache")))
    setup = latent.build(c, str(tmp_path_factory.mktemp("work")), devices=jax.devices()[:1])
    return setup, _all(latent.cached_latents(setup))


def _all(source) -> dict[str, np.ndarray]:
    """Every example of a cache, stacked."""
    rows = [source[i] for i in range(len(source))]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _examples(setup, n: int):
    source = builder(setup.config.data).as_data_source("train")
    return [source[i] for i in range(n)]


def test_cache_holds_each_examples_posterior_and_tokens(cached):
    setup, arrays = cached
    assert arrays["moments"].shape == (64, 8, 8, 8) and arrays["input_ids"].shape == (64, 16)
    examples = _examples(setup, 64)
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    vae_params = jax.tree.map(np.asarray, setup.frozen["vae"])
    posterior = jax.jit(lambda p, x: setup.step.vae.apply({"params": p}, x, method=AutoencoderKL.encode))(
        vae_params, images[:16])
    np.testing.assert_allclose(arrays["moments"][:16, ..., :4], posterior.mean, atol=1e-5)
    np.testing.assert_allclose(arrays["moments"][:16, ..., 4:], posterior.logvar, atol=1e-4)
    seq_len = setup.configs.text_encoder.max_position_embeddings
    want_ids = tokenize(setup.tokenizer, [e["text"].decode() for e in examples], seq_len)
    np.testing.assert_array_equal(arrays["input_ids"], want_ids)


def test_cached_posterior_equals_the_images_posterior(cached, shapes_data_dir, tmp_path):
    """The step differs only in where the posterior comes from (``_posterior``): the same latents
    and the same ``scale_by_std`` scale from images and from their cached moments."""
    setup_c, arrays = cached
    setup_i = latent.build(_one_device_config(shapes_data_dir), str(tmp_path), devices=jax.devices()[:1])
    examples = _examples(setup_i, 8)
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    b_img = setup_i.program.device_batch({"image": images, "input_ids": np.asarray(arrays["input_ids"][:8])})
    b_lat = setup_c.program.device_batch({"moments": np.asarray(arrays["moments"][:8]),
                                          "input_ids": np.asarray(arrays["input_ids"][:8])})
    key = jax.random.key(3)
    vae, vae_params = setup_i.step.vae, setup_i.frozen["vae"]
    z_img = latent_step.posterior(vae, vae_params, b_img).sample(key)
    z_lat = latent_step.posterior(vae, vae_params, b_lat).sample(key)
    np.testing.assert_allclose(z_lat, z_img, atol=1e-4)
    np.testing.assert_allclose(latent.measure_latent_scale(setup_c, b_lat, key),
                               latent.measure_latent_scale(setup_i, b_img, key), rtol=1e-5)


def test_cached_text_needs_frozen_text_encoders(shapes_data_dir, tmp_path):
    c = _one_device_config(shapes_data_dir, cache_latents=True, cache_text=True)  # tiny: its encoder trains
    with pytest.raises(ValueError, match="this run trains its text encoder from scratch"):
        latent.build(c, str(tmp_path), devices=jax.devices()[:1])


def test_cache_is_reused_and_rebuilt_when_stale(cached, monkeypatch, capsys):
    setup, arrays = cached
    capsys.readouterr()
    again = _all(latent.cached_latents(setup))
    assert "caching latents" not in capsys.readouterr().out  # reused, not encoded again
    np.testing.assert_array_equal(again["moments"], arrays["moments"])

    fingerprint = latent.cache_fingerprint(setup)
    path = setup.latent_cache_dir
    assert latent_cache.read(path, fingerprint) is not None
    for key, value in (("vae_sha256", "0" * 64), ("seq_len", 77)):
        assert latent_cache.read(path, dict(fingerprint, **{key: value})) is None, key
    assert latent_cache.read(path, dict(fingerprint, data=dict(fingerprint["data"], seed=1))) is None
    monkeypatch.setattr(latent, "cache_fingerprint", lambda *a: dict(fingerprint, seq_len=77))
    rebuilt = _all(latent.cached_latents(setup))
    assert "caching latents" in capsys.readouterr().out
    assert latent_cache.read(path, fingerprint) is None  # the stale cache was replaced
    np.testing.assert_array_equal(rebuilt["moments"], arrays["moments"])


def test_encoding_writes_chunk_by_chunk_and_resumes(tmp_path, monkeypatch, capsys):
    """A run killed while encoding leaves its finished chunks, and the next run encodes only the
    rest; no more than one chunk of examples is asked for at a time."""
    monkeypatch.setattr(latent_cache, "CHUNK", 4)
    n, asked = 10, []

    def examples(start, stop):
        asked.append((start, stop))
        if len(asked) == 3 and stop == 10:
            raise KeyboardInterrupt  # killed while encoding the last chunk
        idx = np.arange(start, stop, dtype=np.float32)
        return {"image": np.broadcast_to(idx[:, None, None, None], (stop - start, 2, 2, 3)),
                "input_ids": np.repeat(np.arange(start, stop, dtype=np.int32)[:, None], 5, axis=1)}

    def encode(batch):  # images (3, 2, 2, 3) -> moments (3, 1, 1, 2): the image index and its double
        images = batch["image"]
        assert images.shape[0] == 3 and batch["input_ids"].shape == (3, 5)  # the last, shorter batch is padded
        return {"moments": np.concatenate([images[:, :1, :1, :1], 2 * images[:, :1, :1, :1]], axis=-1)}

    build = lambda: latent_cache.build(str(tmp_path / "c"), {"v": 1}, n, examples, encode, 3, "test")  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        build()
    assert asked == [(0, 4), (4, 8), (8, 10)]
    assert latent_cache.read(str(tmp_path / "c"), {"v": 1}) is None  # incomplete: never read
    source = build()
    assert asked[3:] == [(8, 10)]  # only the missing chunk
    got = _all(source)
    np.testing.assert_array_equal(got["moments"][:, 0, 0], np.stack([np.arange(n), 2 * np.arange(n)], -1))
    np.testing.assert_array_equal(got["input_ids"][:, 0], np.arange(n))


def test_training_iterator_reads_the_cache_and_resumes(cached, shapes_data_dir, tmp_path, capsys):
    setup, arrays = cached
    it = latent.make_iterator(setup)
    assert "training on 64 cached latents" in capsys.readouterr().out
    rows = {tuple(ids) for ids in np.asarray(arrays["input_ids"])}
    for _ in range(3):
        batch = next(it)
        assert batch["moments"].shape == (8, 8, 8, 8) and all(tuple(ids) in rows for ids in batch["input_ids"])
    saved = it.get_state()
    want = next(it)
    resumed = latent.make_iterator(setup)
    resumed.set_state(saved)
    got = next(resumed)
    for k in ("moments", "input_ids"):
        np.testing.assert_array_equal(got[k], want[k])

    state = latent.init_state(setup, setup.program.device_batch(batch))
    state, m = setup.program.step(state, setup.program.device_batch(got), setup.frozen)
    assert np.isfinite(float(m["loss"])) and int(state.step) == 1

    c = _one_device_config(shapes_data_dir, cache_latents=True)
    c.data.random_flip = True
    with pytest.raises(ValueError, match="random_flip=False"):
        latent.build(c, str(tmp_path / "flip"), devices=jax.devices()[:1])

