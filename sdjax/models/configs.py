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
from sdjax.models.unet import AddedCond, UNet, UNetConfig

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


def unet_inputs(config: UNetConfig) -> tuple:
    """Small dummy inputs that trace the UNet (for init and ``jax.eval_shape``): the smallest latent
    its downsamplings allow, one timestep, a 77-token context; for SDXL's UNet an added conditioning
    as wide as its embedding's input (the weights' shapes do not depend on how that splits between
    pooled text and micro-conditioning numbers)."""
    side = 2 ** (len(config.block_out_channels) - 1)
    inputs = (jnp.zeros((1, side, side, config.in_channels)), jnp.zeros((1,), jnp.int32),
              jnp.zeros((1, 77, config.cross_attention_dim)))
    if config.addition_embed_type:
        inputs += (AddedCond(jnp.zeros((1, config.projection_class_embeddings_input_dim)), jnp.zeros((1, 0))),)
    return inputs


def vae_inputs(config: AutoencoderConfig) -> tuple:
    f = config.downsample_factor
    return (jnp.zeros((1, f, f, config.in_channels)),)


def text_encoder_inputs(config: TextEncoderConfig) -> tuple:
    return (jnp.zeros((1, config.max_position_embeddings), jnp.int32),)


def init_inputs(configs: ModelConfigs) -> dict[str, tuple]:
    """Small dummy inputs that trace each network (for init and ``jax.eval_shape``)."""
    return dict(unet=unet_inputs(configs.unet), vae=vae_inputs(configs.vae),
                text_encoder=text_encoder_inputs(configs.text_encoder))


def abstract_module_params(module: Any, inputs: tuple) -> Any:
    """Parameter shapes of ``module`` traced on ``inputs`` (``jax.eval_shape``: nothing allocated)."""
    return unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))["params"]


def abstract_params(configs: ModelConfigs, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """Parameter shapes of every network (no memory is allocated)."""
    modules = dict(zip(NETWORKS, build_modules(configs, param_dtype=param_dtype)))
    inputs = init_inputs(configs)
    return {name: abstract_module_params(m, inputs[name]) for name, m in modules.items()}


def count_params(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
