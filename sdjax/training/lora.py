"""Training LoRA adapters: the ``lora`` section of the latent trainer.

With ``lora.rank`` > 0 (``schema.LoraConfig``) the adapters of the UNet's ``targets`` (and, with
``text_encoders``, of the text encoders' ``text_encoder_targets``) are the only trained parameters;
each step merges them into the frozen base kernels (``apply_adapters``), or with ``dropout`` > 0
adds the UNet's beside its frozen layers (``dropout_interceptor``, PEFT's lora_dropout). The export
turns them into ``Adapter``s (``trained_adapters``) that ``sdjax.checkpoints.lora.save`` writes
in the diffusers/PEFT or kohya layout.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax.checkpoints.convert import torch_key
from sdjax.checkpoints.lora import Adapter
from sdjax.models.layers import HeadsDense, HeadsMergeDense, features_to_heads, heads_to_features
from sdjax.training.schema import LORA_TARGETS, TEXT_ENCODER_LORA_TARGETS

@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted layer (static, hashable)."""
    name: str  # the adapter's key in the trained params: the Flax path joined by "__"
    path: tuple[str, ...]  # the kernel's Flax path in the UNet params
    module: str  # the PyTorch module name (what LoRA files call the layer)
    kernel_shape: tuple[int, ...]
    network: str = "unet"  # or "text_encoder", "text_encoder_2"


def params_key(network: str) -> str:
    """Where a network's adapters live in the trained parameters ("unet_lora", "text_encoder_lora", ...)."""
    return f"{network}_lora"


def of_network(targets: tuple[Target, ...], network: str) -> tuple[Target, ...]:
    return tuple(t for t in targets if t.network == network)


def find_targets(params: Any, suffixes: tuple[str, ...], network: str = "unet") -> tuple[Target, ...]:
    """The kernels of one network's ``params`` (arrays or ShapeDtypeStructs) whose module names end in
    one of ``suffixes``; a suffix that matches nothing is an error naming it."""
    found, unused = [], set(suffixes)
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] != "kernel":
            continue
        module = torch_key(path)[:-len(".weight")]
        hits = [t for t in suffixes if module == t or module.endswith("." + t)]
        if hits:
            unused -= set(hits)
            found.append(Target("__".join(path[:-1]), path, module, tuple(leaf.shape), network))
    if unused:
        field, examples = (("targets", LORA_TARGETS) if network == "unet"
                           else ("text_encoder_targets", TEXT_ENCODER_LORA_TARGETS))
        raise ValueError(f"lora.{field} {sorted(unused)} match no layer of {network}; targets are module-name "
                         f"suffixes such as {', '.join(examples)}.")
    return tuple(found)


def init_adapters(key: jax.Array, targets: tuple[Target, ...], rank: int) -> dict[str, dict[str, jax.Array]]:
    """Fresh adapters as PEFT makes them: ``down`` (r, in) uniform in +-1/sqrt(in) (kaiming-uniform with
    a = sqrt(5)), ``up`` (out, r) zero, so training starts from the base model."""
    out = {}
    for i, t in enumerate(targets):
        fan_in = int(np.prod(t.kernel_shape[:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        out[t.name] = {"down": jax.random.uniform(jax.random.fold_in(key, i), (rank, fan_in), jnp.float32,
                                                  -bound, bound),
                       "up": jnp.zeros((t.kernel_shape[-1], rank), jnp.float32)}
    return out


def apply_adapters(unet_params: Any, adapters: dict[str, dict[str, jax.Array]], targets: tuple[Target, ...],
                   scale: float) -> Any:
    """``unet_params`` with each target kernel + scale * (up @ down) (differentiable in the adapters)."""
    flat = traverse_util.flatten_dict(unet_params)
    for t in targets:
        a = adapters[t.name]
        delta = (a["up"] @ a["down"]).T.reshape(t.kernel_shape) * scale  # (out, in) -> Flax (in, out) / (1, 1, in, out)
        flat[t.path] = (flat[t.path].astype(jnp.float32) + delta).astype(flat[t.path].dtype)
    return traverse_util.unflatten_dict(flat)


def dropout_interceptor(adapters: dict[str, dict[str, jax.Array]], targets: tuple[Target, ...], scale: float,
                        rate: float, key: jax.Array):
    """A Flax method interceptor (``nn.intercept_methods``) that runs the UNet on its frozen base
    weights and adds each target layer's adapter as PEFT's LoRA layers do in training:
    ``y = base(x) + scale * up(down(dropout(x)))``. Dropout on the adapter's input cannot be merged
    into the kernel, so training with ``lora.dropout`` > 0 takes this unmerged path; with dropout 0
    it equals ``apply_adapters``. Linear and 1x1-conv targets only (``check_dropout_targets``)."""
    by_path = {t.path[:-1]: (i, t) for i, t in enumerate(targets)}

    def intercept(next_fun, args, kwargs, context):
        hit = by_path.get(context.module.path) if context.method_name == "__call__" else None
        if hit is None or not isinstance(context.module, (nn.Dense, nn.Conv)):
            return next_fun(*args, **kwargs)
        i, t = hit
        x_drop = x = args[0]
        if rate:
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, x.shape)
            x_drop = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
        a = adapters[t.name]
        module = context.module
        if isinstance(module, HeadsMergeDense):  # the flash path's heads-major input: back to features
            x_drop = heads_to_features(x_drop)
        h = x_drop @ a["down"].T.astype(x.dtype)  # (..., r): a 1x1 conv is a matmul over the channels
        delta = (h @ a["up"].T.astype(x.dtype)) * jnp.asarray(scale, x.dtype)
        y = next_fun(*args, **kwargs)
        if isinstance(module, HeadsDense):  # the flash path's heads-major output
            delta = features_to_heads(delta, module.heads)
        return y + delta

    return intercept


def check_dropout_targets(targets: tuple[Target, ...]) -> None:
    """``lora.dropout`` > 0 adapts layers unmerged: linear and 1x1-conv layers only."""
    wide = [t.module for t in targets if len(t.kernel_shape) == 4 and t.kernel_shape[:2] != (1, 1)]
    if wide:
        raise ValueError(f"lora.dropout > 0 supports linear and 1x1-conv targets; {len(wide)} target(s) are wider "
                         f"convolutions (e.g. {wide[0]}): drop them from lora.targets or set lora.dropout=0.")


def trained_adapters(trained: dict[str, Any], targets: tuple[Target, ...], alpha: float) -> list[Adapter]:
    """Trained adapters (host arrays under ``params_key(network)``, as the train state holds them) as
    ``Adapter``s of their networks, in PyTorch layout (conv layers' 4-D)."""
    out = []
    for t in targets:
        a = trained[params_key(t.network)][t.name]
        down, up = np.asarray(a["down"], np.float32), np.asarray(a["up"], np.float32)
        if len(t.kernel_shape) == 4:  # a 1x1 conv: PEFT adapts it with conv adapters
            kh, kw, cin, _ = t.kernel_shape
            down = down.reshape(-1, kh, kw, cin).transpose(0, 3, 1, 2)
            up = up[:, :, None, None]
        out.append(Adapter(t.network, t.module, down, up, alpha))
    return out
