"""The trainers' shared builder: steps compiled ahead of time, once per batch shape."""

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.training.builder import CompiledSteps


def test_compile_all_compiles_each_new_shape_once_in_threads_and_runs_as_the_jit():
    step = jax.jit(lambda state, batch, frozen: (state + frozen * jnp.sum(batch["x"] ** 2), jnp.mean(batch["x"])))
    steps = CompiledSteps(step, jnp.float32(2.0))
    batches = [{"x": jax.ShapeDtypeStruct((2, n), jnp.float32)} for n in (3, 4, 5, 3)]  # one shape twice
    steps.compile_all(jnp.float32(0.0), batches, max_workers=3)
    assert sorted(k[0][1] for k in steps.programs) == [(2, 3), (2, 4), (2, 5)]
    compiled = dict(steps.programs)
    steps.compile_all(jnp.float32(0.0), batches[:2])
    assert steps.programs == compiled and all(steps.programs[k] is v for k, v in compiled.items())  # nothing again
    for n in (3, 4, 5):
        x = np.arange(2 * n, dtype=np.float32).reshape(2, n)
        got = steps(jnp.float32(1.0), {"x": x})
        assert steps.programs == compiled
        np.testing.assert_array_equal(got[0], 1.0 + 2.0 * np.sum(x.astype(np.float64) ** 2))
        np.testing.assert_array_equal(got[1], np.mean(x))
