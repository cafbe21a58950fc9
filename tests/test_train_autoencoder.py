"""Phase-1 trainer: losses against closed forms and direct gradients, the GAN switch, sharded vs
single-device steps, a short training run on captioned_shapes, and the VAE export round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from sdjax import configs
from sdjax.checkpoints import load as load_lib
from sdjax.models.autoencoder import AutoencoderKL
from sdjax.training import autoencoder as ae, autoencoder_loss
from tests.lpips_reference import write_reference

def tiny_config(data_dir: str, mesh_shape=(1, 1)):
    c = configs.load("tiny_autoencoder")
    c.model.block_out_channels = (8, 16)
    c.model.norm_num_groups = 4
    c.model.sample_size = 16
    c.discriminator.ndf = 8
    c.discriminator.n_layers = 1
    c.loss.disc_start = 1
    c.data.data_dir = data_dir
    c.data.image_size = 16
    c.data.num_examples = 80
    c.train.batch_size = 8
    c.train.learning_rate = 2e-3
    c.train.eval_images = 8
    c.train.fast_compile = True
    c.mesh.shape = mesh_shape
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-device setup, its initial state (step 0) and one data batch."""
    config = tiny_config(str(tmp_path_factory.mktemp("data")))
    setup = ae.build(config, devices=jax.devices()[:1])
    iterator = ae.make_iterator(setup)
    batch = {"image": jnp.asarray(next(iterator)["image"])}
    return config, setup, ae.init_state(setup), batch, iterator


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def test_hinge_and_adopt_weight_closed_form():
    real = np.array([[2.0, 0.5], [-1.0, 1.0]], np.float32)
    fake = np.array([[-2.0, 0.0], [3.0, -0.5]], np.float32)
    want = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    np.testing.assert_allclose(autoencoder_loss.hinge_d_loss(real, fake), want, rtol=1e-6)
    assert (float(autoencoder_loss.adopt_weight(0.7, 4, 5)) == 0.0
            and float(autoencoder_loss.adopt_weight(0.7, 5, 5)) == np.float32(0.7))


def test_adaptive_weight_closed_form():
    a, b = np.array([3.0, 4.0], np.float32), np.array([0.0, 1.0], np.float32)
    np.testing.assert_allclose(autoencoder_loss.adaptive_weight(a, b, 0.5), 0.5 * 5.0 / (1.0 + 1e-4), rtol=1e-6)
    assert float(autoencoder_loss.adaptive_weight(a, 0 * b, 1.0)) == 1e4  # clamped


def test_gan_off_before_disc_start_and_adaptive_weight_after(run):
    _, setup, state0, batch, _ = run
    state1, m0 = setup.program.step(copy(state0), batch, setup.frozen)
    assert float(m0["disc_factor"]) == 0.0 and float(m0["disc_loss"]) == 0.0
    assert float(m0["loss"]) == pytest.approx(float(m0["nll_loss"] + 1e-6 * m0["kl_loss"]), rel=1e-6)
    # Zero discriminator gradients leave Adam's update exactly zero.
    jax.tree.map(np.testing.assert_array_equal, state1.params["discriminator"], state0.params["discriminator"])

    # Step 1 == disc_start: the GAN is on. Its adaptive weight against an independent jax.grad
    # of each loss with respect to the decoder's conv_out kernel alone.
    nets, loss, params, key = setup.nets, setup.config.loss, state1.params, state1.step_key()

    def loss_of_last_layer(kernel, which):
        vae = jax.tree.map(lambda x: x, params["autoencoder"])
        vae["decoder"]["conv_out"]["kernel"] = kernel
        losses, _ = autoencoder_loss.generator_losses({"autoencoder": vae, "logvar": params["logvar"]},
                                                      params["discriminator"], None, batch["image"], key, nets, loss)
        return losses[which]

    kernel = params["autoencoder"]["decoder"]["conv_out"]["kernel"]
    grads = jax.jit(lambda k: (jax.grad(loss_of_last_layer)(k, 0), jax.grad(loss_of_last_layer)(k, 2)))(kernel)
    g_nll, g_gan = (np.asarray(g, np.float64) for g in grads)
    want = 0.5 * min(np.linalg.norm(g_nll) / (np.linalg.norm(g_gan) + 1e-4), 1e4)

    state2, m1 = setup.program.step(copy(state1), batch, setup.frozen)
    assert float(m1["disc_factor"]) == 1.0 and float(m1["disc_loss"]) > 0.0
    np.testing.assert_allclose(float(m1["d_weight"]), want, rtol=1e-4)
    np.testing.assert_allclose(float(m1["loss"]), float(m1["nll_loss"] + 1e-6 * m1["kl_loss"]
                                                         + m1["d_weight"] * m1["g_loss"]), rtol=1e-5)
    kernels = [p["discriminator"]["main_0"]["kernel"] for p in (state1.params, state2.params)]
    assert float(jnp.max(jnp.abs(kernels[1] - kernels[0]))) > 0.0


def test_lpips_branch_matches_torch_reference(run, tmp_path):
    """The step's p_loss and nll_loss with LPIPS on, against a direct reconstruction scored by the
    PyTorch LPIPS and the nll written out in numpy."""
    config, _, state0, batch, _ = run
    model, path = write_reference(tmp_path)
    config = tiny_config(config.data.data_dir)
    config.loss.update(lpips_path=path, perceptual_weight=0.7)  # not 1, so the weight is seen to apply
    setup = ae.build(config, devices=jax.devices()[:1])
    # logvar 0.5, not its initial 0: then exp(logvar) != 1, so the nll's division and offset both count.
    state0 = copy(state0).replace(tx=setup.program.shardings.tx)
    state0 = state0.replace(params=dict(state0.params, logvar=jnp.float32(0.5)))
    images = np.asarray(batch["image"], np.float64)

    @jax.jit
    def reconstruct(vae_params, x, key):
        vae = setup.nets.vae
        z = vae.apply({"params": vae_params}, x, method=AutoencoderKL.encode).sample(key)
        return vae.apply({"params": vae_params}, z, method=AutoencoderKL.decode)

    rec = np.asarray(reconstruct(state0.params["autoencoder"], batch["image"], state0.step_key()), np.float64)
    with torch.no_grad():
        nchw = lambda a: torch.from_numpy(a.astype(np.float32)).permute(0, 3, 1, 2)  # noqa: E731
        p = model(nchw(images), nchw(rec)).reshape(-1).numpy().astype(np.float64)
    per_pixel = np.abs(images - rec) + 0.7 * p[:, None, None, None]
    nll = np.sum(per_pixel / np.exp(0.5) + 0.5) / len(images)

    _, m = setup.program.step(state0, batch, setup.frozen)
    assert p.min() > 1e-3  # a random autoencoder's reconstructions are far from the images
    np.testing.assert_allclose(float(m["p_loss"]), p.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(m["nll_loss"]), nll, rtol=1e-5)


def test_sharded_step_matches_single_device(run):
    """What sharding can change, compared: the losses, and the gradients (through Adam's moments after
    the step) relative to each tensor's scale. The weights after an Adam step are not compared: Adam's
    first update lr * g / (|g| + eps) turns a gradient entry within round-off of zero into a full-size
    move whose sign is the round-off's, so they would measure the host's round-off, not sharding."""
    config, setup, state0, batch, _ = run
    config8 = tiny_config(config.data.data_dir, mesh_shape=(2, 4))
    setup8 = ae.build(config8)
    assert dict(setup8.program.mesh.shape) == {"data": 2, "fsdp": 4}
    batch8 = {"image": jax.device_put(batch["image"], setup8.program.batch_sharding)}
    moment = lambda s, name: optax.tree_utils.tree_get(s.opt_state, name)  # noqa: E731
    for _ in range(2):  # GAN off, then on; each step from the same values on both
        state8 = jax.device_put(copy(state0).replace(tx=setup8.program.shardings.tx), setup8.program.shardings)
        state, m = setup.program.step(copy(state0), batch, setup.frozen)
        state8, m8 = setup8.program.step(state8, batch8, setup8.frozen)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), m8, m)
        # mu = 0.1 g and nu = 0.001 g^2 after the first step (the second step's add the first's, decayed),
        # each to 1e-4 of the tensor's largest entry. The key bias is left out: its gradient is exactly
        # zero in exact arithmetic (softmax ignores a shift shared by all keys), so it is round-off only.
        for name in ("mu", "nu"):
            want = jax.tree_util.tree_flatten_with_path(moment(state, name))[0]
            for (path, a), b in zip(want, jax.tree.leaves(moment(state8, name))):
                a, b = np.asarray(a), np.asarray(b)
                if "to_k" not in jax.tree_util.keystr(path):
                    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), (name, jax.tree_util.keystr(path))
        state0 = state


def test_training_improves_reconstructions_and_export_round_trips(run, tmp_path):
    _, setup, state, _, iterator = run
    held_out = ae.eval_images(setup)
    psnr0, _ = ae.evaluate(setup, state.params["autoencoder"], held_out)
    state, rec_losses = copy(state), []
    for _ in range(60):  # long enough that both gains clear their bounds whatever the initial draw
        state, m = setup.program.step(state, {"image": jnp.asarray(next(iterator)["image"])}, setup.frozen)
        rec_losses.append(float(m["rec_loss"]))
    psnr1, grid = ae.evaluate(setup, state.params["autoencoder"], held_out)
    assert np.mean(rec_losses[-5:]) < 0.7 * np.mean(rec_losses[:5]), rec_losses
    assert psnr1 > psnr0 + 1.5, (psnr0, psnr1)
    assert grid.shape == (2 * 16, 8 * 16, 3) and grid.dtype == np.uint8

    config = ae.export(setup, state, str(tmp_path / "vae"), held_out)
    loaded_config, loaded = load_lib.load_vae(str(tmp_path / "vae"))
    assert loaded_config == config and config.scaling_factor != 1.0
    want = setup.reconstruct_fn(state.params["autoencoder"], held_out)
    np.testing.assert_array_equal(setup.reconstruct_fn(loaded, held_out), want)


def test_bad_config_is_reported_before_compiling(tmp_path):
    config = tiny_config(str(tmp_path))
    config.loss.lpips_path = str(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="convert_lpips"):
        ae.build(config, devices=jax.devices()[:1])
    config = tiny_config(str(tmp_path))
    config.data.image_size = 7
    with pytest.raises(ValueError, match="image_size=7"):
        ae.build(config, devices=jax.devices()[:1])


def test_the_autoencoder_phase_refuses_what_only_the_latent_phase_reads(tmp_path):
    from sdjax.training.schema import AutoencoderRunConfig

    c = tiny_config(str(tmp_path))
    AutoencoderRunConfig.from_config(c)  # the tiny config itself is fine
    c.data.buckets = "16x16,8x24"
    with pytest.raises(ValueError, match="data.buckets is the latent phase's"):
        AutoencoderRunConfig.from_config(c)
