"""The configs of a whole Stable Diffusion model, its three Flax modules, and their parameter shapes."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion.schedule import SchedulerConfig
from sdjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from sdjax.models.layers import unbox
from sdjax.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from sdjax.models.unet import UNet, UNetConfig

NETWORKS = ("unet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True)
class ModelConfigs:
    unet: UNetConfig
    vae: AutoencoderConfig
    text_encoder: TextEncoderConfig
    scheduler: SchedulerConfig

    @classmethod
    def from_dicts(cls, d: dict[str, Any]) -> "ModelConfigs":
        return cls(
            unet=UNetConfig.from_diffusers_config(dict(d["unet"])),
            vae=AutoencoderConfig.from_diffusers_config(dict(d["vae"])),
            text_encoder=TextEncoderConfig.from_transformers_config(dict(d["text_encoder"])),
            scheduler=SchedulerConfig.from_diffusers_config(dict(d.get("scheduler") or {})),
        )

    def to_dicts(self) -> dict[str, Any]:
        return dict(unet=self.unet.to_diffusers_config(), vae=self.vae.to_diffusers_config(),
                    text_encoder=self.text_encoder.to_transformers_config(),
                    scheduler=self.scheduler.to_diffusers_config())


def build_modules(configs: ModelConfigs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    """The three Flax modules for ``configs``: (unet, vae, text_encoder)."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    return (UNet(configs.unet, **kw), AutoencoderKL(configs.vae, **kw), CLIPTextEncoder(configs.text_encoder, **kw))


def init_inputs(configs: ModelConfigs) -> dict[str, tuple]:
    """Small dummy inputs that trace each network (for init and ``jax.eval_shape``)."""
    f = configs.vae.downsample_factor
    side = 2 ** (len(configs.unet.block_out_channels) - 1)
    return dict(
        unet=(jnp.zeros((1, side, side, configs.unet.in_channels)), jnp.zeros((1,), jnp.int32),
              jnp.zeros((1, 77, configs.unet.cross_attention_dim))),
        vae=(jnp.zeros((1, f, f, configs.vae.in_channels)),),
        text_encoder=(jnp.zeros((1, configs.text_encoder.max_position_embeddings), jnp.int32),),
    )


def abstract_params(configs: ModelConfigs, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """Parameter shapes of every network via ``jax.eval_shape`` (no memory is allocated)."""
    modules = dict(zip(NETWORKS, build_modules(configs, param_dtype=param_dtype)))
    inputs = init_inputs(configs)
    key = jax.random.key(0)
    return {name: unbox(jax.eval_shape(m.init, key, *inputs[name]))["params"] for name, m in modules.items()}


def count_params(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
