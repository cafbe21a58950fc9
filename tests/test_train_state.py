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
