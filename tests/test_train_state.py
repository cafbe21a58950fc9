"""The train state: the EMA warm-up and the optimizer's learning-rate schedules, against closed forms."""

import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.train_state import ema_decay, make_optimizer


def test_ema_decay_warms_up_to_its_maximum():
    np.testing.assert_allclose(ema_decay(jnp.arange(4), 0.9999), [1 / 10, 2 / 11, 3 / 12, 4 / 13], rtol=1e-6)
    assert float(ema_decay(10**6, 0.999)) == pytest.approx(0.999)


def test_learning_rate_schedules_closed_form():
    kw = dict(learning_rate=1e-3, total_steps=10)
    for schedule in ("constant", "cosine"):  # without warm-up the first step already moves the weights
        _, lr = make_optimizer(warmup_steps=0, schedule=schedule, **kw)
        assert float(lr(0)) == pytest.approx(1e-3)
    _, lr = make_optimizer(warmup_steps=4, schedule="constant", **kw)
    np.testing.assert_allclose([lr(i) for i in (0, 2, 4, 9)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    _, lr = make_optimizer(warmup_steps=0, schedule="cosine", **kw)
    np.testing.assert_allclose([lr(i) for i in (5, 10)], [5e-4, 0.0], rtol=1e-6, atol=1e-12)
    _, lr = make_optimizer(warmup_steps=2, schedule="cosine", **kw)  # then 8 steps of 0.5 (1 + cos(pi t / 8))
    np.testing.assert_allclose([lr(i) for i in (1, 2, 6, 10)], [5e-4, 1e-3, 5e-4, 0.0], rtol=1e-6, atol=1e-12)


def test_train_checkpoints_restore_both_layouts_and_refuse_another_shape(tmp_path):
    """A step is saved without Orbax's per-array sharding file and restores into the run's target;
    a step saved with Orbax's standard handler (sdjax before it dropped that file) restores the same
    way; a state of another shape is refused, before any array is read, with the error that names the
    differing arrays and the fix."""
    import os

    import jax
    import optax
    import orbax.checkpoint as ocp

    from sdjax.checkpoints import train as train_ckpt
    from sdjax.checkpoints.errors import CheckpointError
    from sdjax.train_state import TrainState

    def state(shape, seed):
        params = {"w": jax.random.normal(jax.random.key(seed), shape)}
        return TrainState.create(params=params, tx=optax.adam(1e-3), key=jax.random.key(seed))

    def target(s):
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), s)

    new, old = state((4, 3), 0), state((4, 3), 1)
    manager = train_ckpt.make_manager(str(tmp_path / "new"))
    train_ckpt.save(manager, new)
    manager.wait_until_finished()
    assert "_sharding" not in os.listdir(tmp_path / "new" / "checkpoints" / "0" / "state")
    options = ocp.CheckpointManagerOptions(create=True)
    standard = ocp.CheckpointManager(str(tmp_path / "old" / "checkpoints"), options=options)
    standard.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {f: getattr(old, f) for f in ("step", "params", "ema_params", "opt_state", "rng", "extra")})))
    standard.wait_until_finished()
    assert "_sharding" in os.listdir(tmp_path / "old" / "checkpoints" / "0" / "state")
    for run, want in (("new", new), ("old", old)):
        got = train_ckpt.restore_latest(train_ckpt.make_manager(str(tmp_path / run)), target(want))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match=r"train state: 4 array\(s\) differ \(ema_params.w: saved \(4, 3\), "
                       r"this run \(5, 3\);.*params.w.*Use a new workdir"):
        train_ckpt.restore_latest(manager, target(state((5, 3), 0)))
    bigger = state((4, 3), 0).replace(params={"w": new.params["w"], "b": new.params["w"][0]})
    with pytest.raises(CheckpointError, match=r"params.b: not in the checkpoint"):
        train_ckpt.restore_latest(manager, target(bigger))
    manager.close()
