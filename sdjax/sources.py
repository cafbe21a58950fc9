"""Which networks a model has, with which configs and weights, and which of them train.

The one place that answers it: the latent trainer (``read``: a config's ``pretrained``, ``model``,
``autoencoder`` and ``text_encoder`` sections), the AOT report, the parameter counts and the
benchmarks (``abstract``: the same networks as shapes, from a preset architecture or a config that
holds every network), and everything that generates images (``generation_networks``: the modules
the compiled generate function runs).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sdjax import generate, presets
from sdjax.checkpoints import load as load_lib
from sdjax.models.autoencoder import AutoencoderKL
from sdjax.models.configs import NETWORKS, TEXT_ENCODERS, ModelConfigs, abstract_params
from sdjax.models.layers import resolve_attention
from sdjax.models.text_encoder import CLIPTextEncoder
from sdjax.models.unet import UNet
from sdjax.training.schema import ModelSource


@dataclasses.dataclass(frozen=True)
class Sources:
    """A model's networks: their configs, and the parameters that exist before training starts.

    ``vae``: the frozen autoencoder (None: a random one, smoke tests only); ``text_encoder``: the
    frozen text encoder (None: it trains from scratch); ``text_encoder_2``: SDXL's second, frozen;
    ``unet``: the UNet's starting parameters (None: a random initialisation). With ``abstract`` the
    parameters are ``jax.ShapeDtypeStruct`` trees: a run built from them compiles for any devices
    (``sdjax.aot``) but cannot run.
    """
    configs: ModelConfigs
    vae: Any = None
    text_encoder: Any = None
    unet: Any = None
    tokenizer_dir: str | None = None
    abstract: bool = False
    text_encoder_2: Any = None
    tokenizer_2_dir: str | None = None

    @property
    def trains_text_encoder(self) -> bool:
        return self.text_encoder is None


def with_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Network config dicts with a config's ``model.*`` entries applied: ``model.unet`` replaces the
    UNet's config, other entries update their network's. A UNet attends to the text encoder's width
    unless told otherwise."""
    out = {name: dict(value) if isinstance(value, dict) else value for name, value in base.items()}
    for name, values in overrides.items():
        if name not in out:
            raise ValueError(f"model.{name}: not a network; valid: {', '.join(sorted(out))}.")
        out[name] = dict(values) if name == "unet" else dict(out[name], **values)
    if "text_encoder" in out:
        out["unet"].setdefault("cross_attention_dim", out["text_encoder"]["hidden_size"])
    return out


def model_dicts(source: ModelSource, preset: str | None = None) -> dict[str, Any]:
    """The network configs of ``source`` without reading a checkpoint: a preset's architecture with
    ``model.*`` applied, or a config's ``model`` when it holds every network."""
    if preset:
        return with_overrides(presets.get(preset), source.model)
    if not set(NETWORKS) <= set(source.model):
        raise ValueError("This config reads its architecture from `pretrained`: pass --preset sd15 or sd21.")
    return with_overrides(source.model, {})


def read(source: ModelSource) -> Sources:
    """The networks a training config names (see ``schema.ModelSource``; ``LatentRunConfig`` has checked
    that its sections agree), each checkpoint read once."""
    if not source.pretrained:
        if not source.model.get("unet") or not source.model.get("text_encoder"):
            raise ValueError("Set pretrained=PATH (a Stable Diffusion checkpoint to fine-tune) or model.unet and "
                             "model.text_encoder (the networks to train from scratch).")
        dicts, params = dict(source.model), {}
        if source.text_encoder.pretrained:
            loaded = load_lib.load(source.text_encoder.pretrained)
            dicts["text_encoder"] = loaded.configs.text_encoder.to_transformers_config()
            params["text_encoder"] = loaded.params["text_encoder"]
        if source.autoencoder.path:
            vae_config, params["vae"] = load_lib.load_vae(source.autoencoder.path)
            dicts["vae"] = vae_config.to_diffusers_config()
        return Sources(ModelConfigs.from_dicts(dicts), **params)
    loaded = load_lib.load(source.pretrained)
    configs = ModelConfigs.from_dicts(with_overrides(loaded.configs.to_dicts(), source.model))
    return Sources(configs, vae=loaded.params["vae"], text_encoder=loaded.params.get("text_encoder"),
                   unet=loaded.params["unet"] if source.unet_from_pretrained else None,
                   tokenizer_dir=loaded.tokenizer_dir, text_encoder_2=loaded.params.get("text_encoder_2"),
                   tokenizer_2_dir=loaded.tokenizer_2_dir)


def abstract(source: ModelSource, preset: str | None = None) -> Sources:
    """The networks of ``source`` as shapes (nothing read, nothing allocated): the frozen autoencoder,
    the text encoder (frozen when pretrained) and the starting UNet (what a LoRA run adapts)."""
    configs = ModelConfigs.from_dicts(model_dicts(source, preset))
    params = abstract_params(configs)
    pretrained = bool(source.pretrained or preset)
    frozen_text = pretrained or bool(source.text_encoder.pretrained)
    return Sources(configs, vae=params["vae"], text_encoder=params["text_encoder"] if frozen_text else None,
                   unet=params["unet"] if pretrained and source.unet_from_pretrained else None, abstract=True,
                   text_encoder_2=params.get("text_encoder_2") if frozen_text else None)


def generation_networks(configs: ModelConfigs, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                        attention: str = "auto", platform: str | None = None) -> generate.Networks:
    """The modules a generation runs: UNet and text encoder in ``dtype``, the autoencoder in f32 (its
    decoder in half precision is a known NaN source); ``attention`` resolved for ``platform`` (None:
    the default devices')."""
    platform = platform or jax.devices()[0].platform
    text = {name: CLIPTextEncoder(getattr(configs, name), dtype=dtype, param_dtype=param_dtype)
            if getattr(configs, name) else None for name in TEXT_ENCODERS}
    return generate.Networks(
        UNet(configs.unet, dtype=dtype, param_dtype=param_dtype,
             attention=resolve_attention(attention, platform, dtype)),
        AutoencoderKL(configs.vae, dtype=jnp.float32, param_dtype=param_dtype), **text)
