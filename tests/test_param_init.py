"""Grouped parameter draws: the parameters and boxes equal ``module.init``'s, and the program draws
random bits once per group, not once per parameter."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sdjax.models import layers
from sdjax.models.param_init import init_params, partitioned
from sdjax.models.configs import unet_inputs
from sdjax.models.unet import UNet, UNetConfig

EMBED_INIT = nn.initializers.normal(0.02)


class Net(nn.Module):
    """Two same-shaped dense layers (one group), a third of another shape, an embedding and a
    parameter with Flax's plain initialiser (drawn as ``module.init`` draws it)."""

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        for name in ("a", "b"):
            x = layers.dense(4, name=name, **kw)(x)
        x = layers.dense(3, name="c", **kw)(x)
        table = self.param("table", partitioned(EMBED_INIT, ("vocab", "embed")), (5, 3))
        plain = self.param("plain", nn.initializers.normal(1.0), (3,))
        return x + table.sum(0) + plain


def _random_bits_draws(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "random_bits"
        for sub in jax.core.jaxprs_in_params(eqn.params):
            count += _random_bits_draws(sub)
    return count


def test_parameters_equal_module_inits_and_keep_its_boxes():
    key, x = jax.random.key(7), jnp.ones((2, 4))
    got = init_params(Net(), key, x)
    want = Net().init(key, x)["params"]
    assert jax.tree.structure(got) == jax.tree.structure(want)  # the same boxes, and no deferred ones left
    is_box = lambda b: isinstance(b, nn.Partitioned)  # noqa: E731
    for g, w in zip(jax.tree.leaves(got, is_leaf=is_box), jax.tree.leaves(want, is_leaf=is_box)):
        assert type(g) is type(w) and getattr(g, "names", None) == getattr(w, "names", None)
    # Flax's own draws (each parameter from its own key): the same random bits, the transform to
    # the initialiser's distribution computed batched, so equal up to its last bit.
    got, want = nn.meta.unbox(got), nn.meta.unbox(want)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert np.std(np.asarray(got["a"]["kernel"])) > 0.1  # drawn, not the zeros the forward pass saw
    assert not np.allclose(got["a"]["kernel"], got["b"]["kernel"])  # one group, two keys


def test_a_unets_init_draws_once_per_group_and_keeps_module_inits_boxes():
    config = UNetConfig(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16),
                        layers_per_block=1, attention_head_dim=2, cross_attention_dim=8, norm_num_groups=4)
    unet, key, inputs = UNet(config), jax.random.key(0), unet_inputs(config)
    grouped = jax.make_jaxpr(lambda k: init_params(unet, k, *inputs))(key)
    plain = jax.make_jaxpr(lambda k: unet.init(k, *inputs)["params"])(key)
    got, want = (jax.eval_shape(f, key) for f in (lambda k: init_params(unet, k, *inputs),
                                                  lambda k: unet.init(k, *inputs)["params"]))
    assert jax.tree.map(lambda b: (b.shape, b.dtype), got) == jax.tree.map(lambda b: (b.shape, b.dtype), want)
    assert nn.get_partition_spec(got) == nn.get_partition_spec(want)
    random_params = _random_bits_draws(plain.jaxpr)
    assert random_params > 20  # every kernel drawn by module.init on its own
    assert _random_bits_draws(grouped.jaxpr) <= random_params // 3
