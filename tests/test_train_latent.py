"""Phase-2 training: sharded step parity, gradient accumulation, remat, bf16, a frozen pretrained
text encoder with init_from, two hosts (each its own HOME) against one through the command line,
loss, export, errors (kill, preemption and resume: test_preemption.py).

Everything runs the tiny config (tests/helpers.latent_config) with XLA's backend
optimisation off for the step (``train.fast_compile``); compiled functions are shared by the
module-scoped fixtures.
"""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.extend.core import ClosedJaxpr, Jaxpr

from sdjax.data import make_dataset
from sdjax.models.configs import abstract_params
from sdjax.stable_diffusion import StableDiffusion
from sdjax.train_state import RUN_ONCE_COMPILER_OPTIONS
from sdjax.training import latent
from sdjax.training import latent_step
from sdjax.training.latent_step import min_snr_weight
from tests.helpers import ROOT, free_port, latent_config, logs_tail, subprocess_env, write_image_folder

STEPS = 3


@pytest.fixture(scope="module")
def setup8(shapes_data_dir, tmp_path_factory):
    return latent.build(latent_config(shapes_data_dir), str(tmp_path_factory.mktemp("w8")))


def _batches(setup):
    """``setup``'s training batches (this one process's: the whole global batch): images and token ids."""
    it = make_dataset(setup.config.data,
                      tokenize=lambda text: latent.tokenize(setup.tokenizer, [text], setup.seq_len)[0])
    for batch in it:
        yield {k: batch[k] for k in ("image", "input_ids")}


@pytest.fixture(scope="module")
def start(setup8):
    """A first batch and setup8's initial state on it, in host memory (reused by every setup)."""
    host = next(_batches(setup8))
    return host, jax.tree.map(np.asarray, latent.init_state(setup8, setup8.program.device_batch(host)))


def _build1(shapes_data_dir: str, workdir: str, **train):
    """The test config on one device, with ``train`` overrides: options that change no sharding are
    checked here, where each compile and step costs a fraction of the 2 x 4 mesh's."""
    c = latent_config(shapes_data_dir)
    c.mesh.shape = (1, 1)
    c.train.update(train)
    return latent.build(c, workdir, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def setup1(shapes_data_dir, tmp_path_factory):
    return _build1(shapes_data_dir, str(tmp_path_factory.mktemp("w1")))


def _first_step(setup, start):
    """``setup``'s first step from ``start``: (state after it, metrics), in host memory."""
    host, state0 = start
    state, m = setup.program.step(_put(setup, state0), setup.program.device_batch(host), setup.frozen)
    return jax.tree.map(np.asarray, state), jax.device_get(m)


@pytest.fixture(scope="module")
def step1(setup1, start):
    return _first_step(setup1, start)


def _put(setup, host_state):
    """A host copy of a state placed into ``setup``'s shardings (no buffer shared with other runs)."""
    return jax.device_put(host_state.replace(tx=setup.program.shardings.tx), setup.program.shardings)


def _flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


# Adam's first update is lr * g / (|g| + eps), eps = 1e-8. Where |g| is within a few eps of zero (the
# text encoder's key biases have an exactly zero gradient: softmax ignores a shift shared by all
# keys; a bias's gradient can sum to ~1e-9 by chance), two runs that round differently move the
# weight by anything in [-lr, lr]; where |g| >= 100 eps the move is lr to within 1%, whatever the
# rounding. So weights are compared to ADAM_ATOL where the gradient is at least that, and every
# gradient itself, tightly, through Adam's first moment (0.1 x the clipped gradient after one step).
ADAM_ATOL = 1e-4
ADAM_MOVE_FROM = 1e-6  # |g| from which Adam's first step is the rate's sign, not its rounding


def _assert_trees_close(got, want, rtol, atol, atol_of_max=0.0):
    """Leaf by leaf to rtol and atol + atol_of_max * max|want leaf|."""
    got, want = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (got, want))
    assert [path for path, _ in got] == [path for path, _ in want]
    for (path, a), (_, b) in zip(got, want):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol,
                                   atol=atol + atol_of_max * float(np.abs(b).max(initial=0.0)),
                                   err_msg=jax.tree_util.keystr(path))


def _assert_steps_match(got, want, grad_rtol: float, grad_atol_of_max: float = 0.0):
    """Two states one step after the same start: weights and EMA to ADAM_ATOL where the gradient is
    at least ADAM_MOVE_FROM, gradients to grad_rtol (and, where grad_atol_of_max is given, to that
    fraction of each leaf's largest gradient)."""
    mu = lambda s: optax.tree_utils.tree_get(s.opt_state, "mu")  # noqa: E731
    moved = jax.tree.map(lambda m: np.abs(np.asarray(m)) >= 0.1 * ADAM_MOVE_FROM, mu(want))
    assert sum(int(x.sum()) for x in jax.tree.leaves(moved)) > 0.9 * sum(x.size for x in jax.tree.leaves(moved))
    # Where the gradient is below it, got's weight is replaced by want's (so equal by construction).
    kept = [jax.tree.map(lambda x, m, w: np.where(m, x, w), t, moved, w)
            for t, w in ((got.params, want.params), (got.ema_params, want.ema_params))]
    _assert_trees_close(kept, [want.params, want.ema_params], rtol=1e-6, atol=ADAM_ATOL)
    _assert_trees_close(mu(got), mu(want), rtol=grad_rtol, atol=1e-8, atol_of_max=grad_atol_of_max)
    assert int(got.step) == int(want.step) == 1


def test_min_snr_weight_closed_form():
    snr = jnp.asarray([0.5, 5.0, 50.0])
    np.testing.assert_allclose(min_snr_weight(snr, 5.0, "epsilon"), [1.0, 1.0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(min_snr_weight(snr, 5.0, "v_prediction"), [0.5 / 1.5, 5 / 6, 5 / 51], rtol=1e-6)


def test_config_errors_come_before_compiling(shapes_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before the config check"))
    c = latent_config(shapes_data_dir)
    c.mesh.shape = (3, 4)
    with pytest.raises(ValueError, match="has 12 devices but this run has 8"):
        latent.build(c, str(tmp_path))
    c = latent_config(shapes_data_dir)
    c.train.batch_size = 12
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        latent.build(c, str(tmp_path))
    c = latent_config(shapes_data_dir)
    c.train.dtype = "float64"
    with pytest.raises(ValueError, match="train.dtype"):
        latent.build(c, str(tmp_path))


def test_sharded_step_matches_single_device(setup8, setup1, start, step1):
    """The same initial values (``start``, through host memory) stepped on the 2 x 4 mesh and on one device."""
    s8 = _put(setup8, start[1])
    assert len({s.device for s in s8.params["unet"]["conv_in"]["kernel"].addressable_shards}) == 8
    assert len({s.device for s in _put(setup1, start[1]).params["unet"]["conv_in"]["kernel"].addressable_shards}) == 1
    s8, m8 = _first_step(setup8, start)
    s1, m1 = step1
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    _assert_steps_match(s8, s1, grad_rtol=1e-4)


def test_loss_falls_and_export_loads(setup1, start, tmp_path):
    batches = _batches(setup1)
    state = _put(setup1, start[1])
    losses = []
    for _ in range(40):
        state, m = setup1.program.step(state, setup1.program.device_batch(next(batches)), setup1.frozen)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses

    latent.export(setup1, state, str(tmp_path / "export"))
    sd = StableDiffusion.from_pretrained(str(tmp_path / "export"))
    assert sd.configs.vae.scaling_factor == pytest.approx(float(state.extra["latent_scale"]))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    ctx = sd.encode_prompt(["a red circle on a green background", ""])
    t = jnp.asarray([10, 500])
    want = jax.jit(setup1.step.unet.apply)({"params": state.ema_params["unet"]}, x, t, ctx)
    np.testing.assert_allclose(sd.unet_apply(x, t, ctx), want, rtol=1e-5, atol=1e-6)
    ema_text = jax.jit(setup1.step.text_encoder.apply)(
        {"params": state.ema_params["text_encoder"]},
        jnp.asarray(sd.tokenize(["a red circle on a green background"]))).context_BLD
    np.testing.assert_allclose(ctx[:1], ema_text, rtol=1e-5, atol=1e-6)


def test_grad_accum_averages_interleaved_micro_batches(shapes_data_dir, start, tmp_path):
    """grad_accum=2 against value_and_grad of each micro-batch (rows 0::2, then 1::2), on one device."""
    setup = _build1(shapes_data_dir, str(tmp_path), grad_accum=2)
    host = start[0]
    state0 = start[1].replace(tx=setup.program.shardings.tx)
    state, m = setup.program.step(_put(setup, state0), setup.program.device_batch(host), setup.frozen)

    cfg = setup.step
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(latent_step.micro_loss, step=cfg)),
                      compiler_options=RUN_ONCE_COMPILER_OPTIONS)
    frozen = jax.tree.map(np.asarray, setup.frozen)
    micro = [grad_fn(state0.params, frozen, {k: v[i::2] for k, v in host.items()},
                     jax.random.fold_in(state0.step_key(), i), state0.extra["latent_scale"]) for i in range(2)]
    loss, grads = jax.tree.map(lambda a, b: (a + b) / 2, *micro)
    want = jax.jit(lambda s, g: s.apply_gradients(g, cfg.ema_decay), compiler_options=RUN_ONCE_COMPILER_OPTIONS)(
        state0, grads)

    assert abs(float(micro[0][0] - micro[1][0])) > 1e-3  # two different micro-batches, not one twice
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], optax.global_norm(grads), rtol=1e-5)
    _assert_steps_match(state, want, grad_rtol=1e-4)


def _primitive_names(jaxpr):
    """Every primitive in ``jaxpr``, nested jaxprs (scans, custom gradients, remat) included."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, ClosedJaxpr):
                    yield from _primitive_names(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    yield from _primitive_names(sub)


def test_remat_recomputes_without_changing_the_step(shapes_data_dir, setup1, start, step1, tmp_path):
    setup = _build1(shapes_data_dir, str(tmp_path), remat=True)
    host, state0 = start
    args = (_put(setup, state0), setup.program.device_batch(host), setup.frozen)
    # jax.checkpoint's primitive ("remat2" in JAX 0.10, "checkpoint" in older releases).
    is_remat = lambda name: "remat" in name or "checkpoint" in name  # noqa: E731
    assert any(map(is_remat, _primitive_names(setup.program.step.trace(*args).jaxpr.jaxpr)))
    plain = setup1.program.step.trace(_put(setup1, state0), setup1.program.device_batch(host), setup1.frozen)
    assert not any(map(is_remat, _primitive_names(plain.jaxpr.jaxpr)))

    state, m = setup.program.step(*args)
    want, want_m = step1
    np.testing.assert_allclose(m["loss"], want_m["loss"], rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], want_m["grad_norm"], rtol=1e-6)
    # Recomputing the forward pass changes XLA's summation order: a token-embedding entry that is a
    # sum with cancellation (1 of 32,768) differed by 1.6e-8, relative 7.7e-5; every entry is also
    # held to 1e-5 of its leaf's largest.
    _assert_steps_match(state, want, grad_rtol=1e-5, grad_atol_of_max=1e-5)


def _cosine(a, b):
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]).astype(np.float64) for t in (a, b))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bf16_step_keeps_f32_master_weights_and_tracks_f32(shapes_data_dir, start, step1, tmp_path):
    setup = _build1(shapes_data_dir, str(tmp_path), dtype="bfloat16")
    host, state0 = start
    state, m = setup.program.step(_put(setup, state0), setup.program.device_batch(host), setup.frozen)
    for name in ("params", "ema_params", "opt_state"):
        floats = [x for x in jax.tree.leaves(getattr(state, name)) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats), name

    want, want_m = step1
    # bf16 keeps 8 significant bits (relative rounding 2**-9 per operation). The loss averages
    # 8 x 8 x 8 x 4 squared errors of order 1, so rounding through the UNet's ~20 layers mostly
    # cancels in it (2e-4 here); the gradient norm, a sum of squares, keeps more of it (7e-3).
    assert np.isfinite(m["loss"])
    np.testing.assert_allclose(m["loss"], want_m["loss"], rtol=2e-2)
    np.testing.assert_allclose(m["grad_norm"], want_m["grad_norm"], rtol=5e-2)
    # The gradient's direction, through Adam's first moment (see ADAM_ATOL).
    mu = lambda s: optax.tree_utils.tree_get(s.opt_state, "mu")  # noqa: E731
    assert _cosine(mu(state), mu(want)) > 0.999
    # The first Adam update is about lr * sign(gradient): components whose gradient is within
    # bf16's rounding noise can flip sign, so the update's direction agrees less (0.985 here).
    delta = lambda s: jax.tree.map(lambda a, b: np.asarray(a) - b, s.params, state0.params)  # noqa: E731
    assert _cosine(delta(state), delta(want)) > 0.95


def test_frozen_pretrained_text_encoder_and_init_from(shapes_data_dir, setup1, start, step1, tmp_path):
    """text_encoder.pretrained + train.init_from pointing at an export of setup1 after one step."""
    host, state0 = start
    export = str(tmp_path / "export")
    latent.export(setup1, _put(setup1, step1[0]), export)
    sd = StableDiffusion.from_pretrained(export)
    exported_unet, exported_text = _flat(sd.params["unet"]), _flat(sd.params["text_encoder"])
    assert any(not np.array_equal(v, _flat(state0.params["unet"])[k]) for k, v in exported_unet.items())

    c = latent_config(shapes_data_dir)
    c.mesh.shape = (1, 1)
    c.text_encoder.pretrained = export
    c.tokenizer.dir = os.path.join(export, "tokenizer")
    c.train.update(init_from=export, scale_by_std=False)  # no latent-scale measurement: one compile fewer
    setup = latent.build(c, str(tmp_path / "w"), devices=jax.devices()[:1])
    batch = setup.program.device_batch(host)
    state = latent.init_state(setup, batch)
    assert set(state.params) == {"unet"}  # the text encoder is frozen: not trained, no EMA, no moments
    for tree in (state.params["unet"], state.ema_params["unet"]):
        got = _flat(tree)
        assert got.keys() == exported_unet.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], exported_unet[k], err_msg=k)
    # The started UNet is not drawn first: the fresh state's program draws no random bits.
    program = jax.make_jaxpr(lambda key, start: setup.program.init_from_start(key, 1.0, start=start))(
        jax.random.key(0), state.params)
    assert "random_bits" not in str(program) and "random_bits" in str(jax.make_jaxpr(setup.program.init)(
        jax.random.key(0), 1.0))

    initial = jax.tree.map(np.asarray, state)
    state, m = setup.program.step(state, batch, setup.frozen)
    got = _flat(state.params["unet"])
    assert any(not np.array_equal(got[k], exported_unet[k]) for k in got)
    for tree in (setup.frozen["text_encoder"], latent.inference_params(setup, state)["text_encoder"]):
        got = _flat(tree)
        assert got.keys() == exported_text.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], exported_text[k], err_msg=k)

    # The step conditions on the exported encoder: setup1, which trains its own text encoder,
    # computes the same loss when that encoder starts from the export's.
    params = {"unet": initial.params["unet"], "text_encoder": jax.tree.map(np.asarray, sd.params["text_encoder"])}
    s1 = initial.replace(params=params, ema_params=params, opt_state=setup1.program.shardings.tx.init(params))
    _, m1 = setup1.program.step(_put(setup1, s1), setup1.program.device_batch(host), setup1.frozen)
    np.testing.assert_allclose(m["loss"], m1["loss"], rtol=1e-5)

    # A checkpoint whose UNet is half as wide: the same tree with other shapes.
    narrow = dataclasses.replace(setup.configs, unet=dataclasses.replace(setup.configs.unet,
                                                                         block_out_channels=(16, 32)))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_params(narrow))
    StableDiffusion(narrow, zeros).save_pretrained(str(tmp_path / "narrow"))
    bad = dataclasses.replace(setup, config=dataclasses.replace(
        setup.config, train=dataclasses.replace(setup.config.train, init_from=str(tmp_path / "narrow"))))
    with pytest.raises(ValueError, match="init_from=.*narrow.*do not match config.model"):
        latent.init_state(bad, batch)


def _env(devices: int, cache_dir: str, **extra: str) -> dict[str, str]:
    """A command's environment (``subprocess_env``) running train/latent.py from the checkout, with its
    own compilation cache."""
    return subprocess_env(devices, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=cache_dir, **extra)


def _saved_state(workdir: str, step: int) -> dict:
    """A saved train state as host arrays, whatever devices and processes wrote it."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    return ckptr.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


@pytest.mark.slow
def test_two_hosts_each_with_its_own_home_match_one(tmp_path):
    """The README's pod command on two processes, each with its own HOME (so its own
    ~/tensorflow_datasets and, here, its own latent cache), training on an image folder with a
    corrupt image and a missing caption: the same weights as one process running the same command."""
    folder = write_image_folder(tmp_path / "images", 24)
    steps = 3

    def cmd(workdir):
        return [sys.executable, os.path.join(ROOT, "train", "latent.py"), "--config", "tiny", "--workdir", workdir,
                "--export", os.path.join(workdir, "export"), "--config.data.name=captioned_images",
                f"--config.data.manual_dir={folder}", "--config.tokenizer.from_captions=True",
                "--config.train.batch_size=8", f"--config.train.steps={steps}",
                f"--config.train.checkpoint_every={steps}",
                "--config.train.sample_every=0", "--config.train.log_every=1", "--config.train.fast_compile=True",
                "--config.train.cache_latents=True", "--config.train.latent_cache_dir=~/latent_cache",
                "--config.mesh.shape=(2,4)"]

    port, cache = free_port(), str(tmp_path / "xla")
    homes = [tmp_path / f"home{i}" for i in range(3)]
    logs = [open(tmp_path / f"host{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(cmd(str(tmp_path / "two")), stdout=logs[i], stderr=subprocess.STDOUT,
                              env=_env(4, cache, HOME=str(homes[i]), SDJAX_COORDINATOR=f"localhost:{port}",
                                       SDJAX_NUM_PROCESSES="2", SDJAX_PROCESS_ID=str(i))) for i in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p, log in zip(procs, logs):
            p.kill()
            log.close()
    host_logs = [(tmp_path / f"host{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs_tail(host_logs)
    one = subprocess.run(cmd(str(tmp_path / "one")), env=_env(8, cache, HOME=str(homes[2])), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    for home in homes:  # each host prepared its own copy of the data and encoded its own cache
        assert list((home / "tensorflow_datasets" / "captioned_images").glob("folder_*/1.0.0"))
        assert (home / "latent_cache" / "meta.json").is_file()
    assert all("each host encodes all of it" in log for log in host_logs)
    assert "prepared 24 examples; skipped 1 unreadable image (corrupt.png), 1 entry without caption" in host_logs[0]
    saved = _saved_state(str(tmp_path / "two"), steps)
    got, want = _flat(saved["params"]), _flat(_saved_state(str(tmp_path / "one"), steps)["params"])
    assert got.keys() == want.keys()
    for k in want:
        # atol: attention key biases have an exactly zero gradient (softmax ignores them), so Adam
        # turns the different reduction order's rounding noise into ~1e-5 moves on either run.
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=5e-5, err_msg=k)

    # The two processes' export holds exactly the EMA weights they trained, gathered from both.
    sd = StableDiffusion.from_pretrained(str(tmp_path / "two" / "export"))
    exported = _flat({"unet": sd.params["unet"], "text_encoder": sd.params["text_encoder"]})
    assert exported.keys() == _flat(saved["ema_params"]).keys()
    for k, v in _flat(saved["ema_params"]).items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_vae_export_round_trip(tmp_path):
    from sdjax.checkpoints.load import load_vae
    from sdjax.checkpoints.sdjax_format import save_vae
    from sdjax.models.autoencoder import AutoencoderConfig

    config = AutoencoderConfig(block_out_channels=(8, 8), norm_num_groups=4, scaling_factor=0.5)
    params = {"encoder": {"conv_in": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)}}}
    save_vae(str(tmp_path / "vae"), config, params)
    got_config, got = load_vae(str(tmp_path / "vae"))
    assert got_config == config
    np.testing.assert_array_equal(got["encoder"]["conv_in"]["kernel"], params["encoder"]["conv_in"]["kernel"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_vae(str(tmp_path / "missing"))


def test_word_tokenizer_gives_one_token_per_caption_word(tmp_path):
    from sdjax.tokenizer import load_tokenizer
    from sdjax.training.word_tokenizer import write_word_tokenizer

    words = latent_config("unused").tokenizer.words.split()
    tok = load_tokenizer(write_word_tokenizer(tmp_path, words))
    assert tok.tokenize("a yellow triangle on a green background") == [
        "a</w>", "yellow</w>", "triangle</w>", "on</w>", "a</w>", "green</w>", "background</w>"]


def test_word_tokenizer_files_appear_whole_to_a_concurrent_reader(tmp_path):
    """Processes sharing a machine write the same tokenizer folder (a bucket workdir's local mirror)
    while others read it: a reader never sees a half-written vocab.json."""
    import json
    import threading

    from sdjax.training.word_tokenizer import write_word_tokenizer

    words = [f"word{i}" for i in range(3000)]
    write_word_tokenizer(tmp_path, words)
    errors, done = [], threading.Event()

    def read():
        while not done.is_set():
            try:
                json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
            except ValueError as e:
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(20):
            write_word_tokenizer(tmp_path, words)
    finally:
        done.set()
        reader.join()
    assert not errors, f"{len(errors)} reads of a half-written vocab.json, e.g. {errors[0]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
