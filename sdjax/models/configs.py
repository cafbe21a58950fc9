"""The configs of a whole Stable Diffusion model, its three Flax modules, and their parameter shapes."""

import dataclasses
import functools
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
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the UNet attends to their contexts, concatenated


@dataclasses.dataclass(frozen=True)
class ModelConfigs:
    """Every network's config and the noise schedule. SDXL is the same set plus ``text_encoder_2``
    (OpenCLIP ViT-bigG with its projection), read with a UNet whose ``addition_embed_type`` is
    "text_time"; both its encoders give the UNet their penultimate hidden state, as diffusers'
    SDXL pipelines read them; SDXL's refiner has ``text_encoder_2`` alone (``text_encoder`` None).
    ``force_zeros_for_empty_prompt``: no negative prompt means a zero negative conditioning (SDXL
    base), not the empty prompt's. ``requires_aesthetics_score``: the micro-conditioning ends in an
    aesthetic score instead of the target size (SDXL refiner)."""
    unet: UNetConfig
    vae: AutoencoderConfig
    text_encoder: TextEncoderConfig | None
    scheduler: SchedulerConfig
    text_encoder_2: TextEncoderConfig | None = None
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        """The text encoders the model has (SD 1/2: one; SDXL: two; its refiner: the second)."""
        return tuple(name for name in TEXT_ENCODERS if getattr(self, name))

    @property
    def networks(self) -> tuple[str, ...]:
        return ("unet", "vae") + self.text_encoder_names

    @property
    def is_sdxl(self) -> bool:
        return self.unet.addition_embed_type == "text_time"

    @classmethod
    def from_dicts(cls, d: dict[str, Any]) -> "ModelConfigs":
        unet = UNetConfig.from_diffusers_config(dict(d["unet"]))
        text = {"output_layer": "penultimate_hidden"} if unet.addition_embed_type == "text_time" else {}
        if unet.addition_embed_type and not d.get("text_encoder_2"):
            raise ValueError("An SDXL UNet (addition_embed_type='text_time') conditions on a second text "
                             "encoder's pooled output: the model needs text_encoder_2.")
        if not d.get("text_encoder") and not unet.addition_embed_type:
            raise ValueError("The model has no text encoder: SD 1/2 models need text_encoder.")
        encoders = {name: TextEncoderConfig.from_transformers_config(dict(d[name]), **text) if d.get(name) else None
                    for name in TEXT_ENCODERS}
        return cls(
            unet=unet,
            vae=AutoencoderConfig.from_diffusers_config(dict(d["vae"])),
            scheduler=SchedulerConfig.from_diffusers_config(dict(d.get("scheduler") or {})),
            force_zeros_for_empty_prompt=bool(d.get("force_zeros_for_empty_prompt", False)),
            requires_aesthetics_score=bool(d.get("requires_aesthetics_score", False)),
            **encoders,
        )

    def to_dicts(self) -> dict[str, Any]:
        d = dict(unet=self.unet.to_diffusers_config(), vae=self.vae.to_diffusers_config(),
                 scheduler=self.scheduler.to_diffusers_config())
        d.update({name: getattr(self, name).to_transformers_config()
                  for name in self.text_encoder_names})
        if self.is_sdxl:
            d.update(force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                     requires_aesthetics_score=self.requires_aesthetics_score)
        return d


def build_modules(configs: ModelConfigs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
                  ) -> dict[str, Any]:
    """The Flax module of each of ``configs.networks``."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    modules = dict(unet=UNet(configs.unet, **kw), vae=AutoencoderKL(configs.vae, **kw))
    modules.update({name: CLIPTextEncoder(getattr(configs, name), **kw)
                    for name in configs.text_encoder_names})
    return modules


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
    inputs = dict(unet=unet_inputs(configs.unet), vae=vae_inputs(configs.vae))
    inputs.update({name: text_encoder_inputs(getattr(configs, name))
                   for name in configs.text_encoder_names})
    return inputs


def abstract_module_params(module: Any, inputs: tuple) -> Any:
    """Parameter shapes of ``module`` traced on ``inputs`` (``jax.eval_shape``: nothing allocated).
    Traced once per process for each module and input shapes (a full-size UNet's trace takes
    seconds; loading, exporting and counting all ask for it); each call returns its own containers."""
    leaves, treedef = jax.tree.flatten(inputs)
    specs = tuple(jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in leaves)
    return jax.tree.map(lambda x: x, _traced_params(module, treedef, specs))


@functools.lru_cache(maxsize=64)
def _traced_params(module: Any, treedef: Any, specs: tuple) -> Any:
    inputs = jax.tree.unflatten(treedef, specs)
    return unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))["params"]


def abstract_params(configs: ModelConfigs, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """Parameter shapes of every network (no memory is allocated)."""
    modules = build_modules(configs, param_dtype=param_dtype)
    inputs = init_inputs(configs)
    return {name: abstract_module_params(m, inputs[name]) for name, m in modules.items()}


def count_params(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
