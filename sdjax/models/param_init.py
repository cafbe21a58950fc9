"""Fresh parameters drawn a group at a time, so a network's init compiles in seconds.

``module.init`` draws every parameter with PRNG ops of its own (its random bits and their
transform to its distribution), so the init program grows with the parameter count and its compile
is mostly those draws. ``init_params`` runs ``module.init`` with the draws of the parameters made
by ``partitioned`` initialisers deferred, then draws them one group at a time: the parameters of
one initialiser, shape and dtype in one vmapped draw, each from the key Flax gave it. The values are
``module.init``'s (the same random bits; the transform may differ in the last bit). Outside
``init_params`` (``module.init``, shape evaluation) a ``partitioned`` initialiser draws at once, as
``nn.with_logical_partitioning`` does.
"""

import collections
import contextvars
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

_DEFERRING = contextvars.ContextVar("sdjax_deferring_parameter_draws", default=False)


class _Deferred(nn.LogicallyPartitioned):
    """A parameter whose draw ``init_params`` makes later: ``value`` holds zeros of its shape."""
    key: Any = None  # the key Flax gave the parameter's initialiser
    init: Callable = flax.struct.field(pytree_node=False, default=None)


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
    """``nn.with_logical_partitioning(init, names)`` whose draw ``init_params`` groups with others."""
    def draw(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> nn.LogicallyPartitioned:
        if _DEFERRING.get():
            return _Deferred(jnp.zeros(shape, dtype), tuple(names), key=key, init=init)
        return nn.LogicallyPartitioned(init(key, shape, dtype), tuple(names))
    return draw


def init_params(module: nn.Module, key: jax.Array, *inputs: Any) -> Any:
    """``module.init(key, *inputs)["params"]`` (logical boxes kept), the ``partitioned`` parameters
    drawn a group at a time (see the module's docstring)."""
    token = _DEFERRING.set(True)
    try:
        params = module.init(key, *inputs)["params"]  # the forward pass sees zeros; its outputs are unused
    finally:
        _DEFERRING.reset(token)
    deferred = lambda x: isinstance(x, _Deferred)  # noqa: E731
    leaves, tree = jax.tree.flatten(params, is_leaf=deferred)
    groups = collections.defaultdict(list)  # (initialiser, shape, dtype) -> leaf indices
    for i, leaf in enumerate(leaves):
        if deferred(leaf):
            groups[leaf.init, leaf.value.shape, leaf.value.dtype].append(i)
    for (init, shape, dtype), members in groups.items():
        values = jax.vmap(lambda k: init(k, shape, dtype))(jnp.stack([leaves[i].key for i in members]))
        for row, i in enumerate(members):
            leaves[i] = nn.LogicallyPartitioned(values[row], leaves[i].names)
    return jax.tree.unflatten(tree, leaves)
