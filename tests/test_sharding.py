"""Mesh construction, logical-axis rules and batch checks (no compilation)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sdjax import sharding

RULES = (("batch", ("data", "fsdp")), ("conv_out", "fsdp"), ("dense_out", "fsdp"), ("dense_in", "tensor"),
         ("embed", "fsdp"))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, -1), ("data", "fsdp"))


def test_mesh_fills_minus_one(mesh):
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.devices.size == len(jax.devices())


@pytest.mark.parametrize("shape,axes,match", [
    ((3, 4), ("data", "fsdp"), "has 12 devices but this run has 8"),
    ((3, -1), ("data", "fsdp"), "cannot be split"),
    ((-1, -1), ("data", "fsdp"), "at most one -1"),
    ((8,), ("data", "fsdp"), "same length"),
])
def test_bad_mesh_messages(shape, axes, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(shape, axes)


def test_rules_skip_indivisible_dims_and_absent_axes(mesh):
    # 64 splits over fsdp=4; 30 does not, so that kernel falls back to replication.
    assert sharding.logical_to_mesh_spec((None, None, "conv_in", "conv_out"), (3, 3, 16, 64), mesh, RULES) == \
        P(None, None, None, "fsdp")
    assert sharding.logical_to_mesh_spec(("dense_in", "dense_out"), (8, 30), mesh, RULES) == P(None, None)
    # "tensor" is not in the mesh: the dense_in rule is dropped, not an error.
    assert sharding.logical_to_mesh_spec(("dense_in", "dense_out"), (8, 32), mesh, RULES) == P(None, "fsdp")
    # A mesh axis is used once per array: the second name wanting fsdp stays replicated.
    assert sharding.logical_to_mesh_spec(("embed", "dense_out"), (8, 32), mesh, RULES) == P("fsdp", None)


def test_tree_shardings_follow_boxes(mesh):
    import flax.linen as nn
    import jax.numpy as jnp

    def init():
        k = nn.Partitioned(jnp.zeros((4, 32)), names=("dense_in", "dense_out"))
        return {"kernel": k, "step": jnp.zeros((), jnp.int32)}

    shardings = sharding.tree_shardings(jax.eval_shape(init), mesh, RULES)
    assert shardings["kernel"].spec == P(None, "fsdp")
    assert shardings["step"].spec == P()


def test_batch_must_split_evenly_over_data_parallelism_and_micro_batches(mesh):
    assert sharding.data_parallel_size(mesh, RULES) == 8
    sharding.check_batch_size(16, mesh, RULES, micro_batches=2)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        sharding.check_batch_size(12, mesh, RULES)
    with pytest.raises(ValueError, match="micro-batch size 4 .* data-parallel size 8"):
        sharding.check_batch_size(8, mesh, RULES, micro_batches=2)
    with pytest.raises(ValueError, match="not divisible by train.grad_accum=3"):
        sharding.check_batch_size(16, mesh, RULES, micro_batches=3)


def test_global_batch_is_sharded_over_batch_axes(mesh):
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    g = sharding.global_batch({"x": x}, sharding.batch_sharding(mesh, RULES))["x"]
    np.testing.assert_array_equal(np.asarray(g), x)
    assert g.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
