"""LoRA adapters merged into a model's weights (``StableDiffusion.with_lora``).

The update ``W += scale * alpha / rank * up @ down`` is merged into every adapted layer of the UNet
and the text encoders (attention q/k/v/out, transformer proj_in/proj_out, feed-forward, resnet
convs: LoCon): sampling costs nothing extra, and since the parameters are arguments of the compiled
functions, a model with a LoRA merged at any scale reuses them without recompiling. Reading and
writing LoRA files: ``sdjax.checkpoints.lora``; training adapters: ``sdjax.training.lora``.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sdjax.checkpoints.convert import torch_key
from sdjax.checkpoints.errors import CheckpointError
from sdjax.checkpoints.lora import NETWORKS, Adapter, kohya_names
from sdjax.checkpoints.name_tables import UNetLayout, unet_table


def _layer_index(params: dict[str, Any]) -> dict[tuple[str, str], tuple[str, ...]]:
    """(network, module name) -> Flax path of the layer's kernel, under PyTorch and kohya spellings; the
    UNet's also under kohya's spelling of the original (LDM / sgm) module names, as kohya's SDXL
    LoRAs name them."""
    index = {}
    for network in NETWORKS:
        if network not in params:
            continue
        modules = {torch_key(path)[:-len(".weight")]: path
                   for path in traverse_util.flatten_dict(params[network]) if path[-1] == "kernel"}
        for module, path in modules.items():
            index[(network, module)] = path
            index.update({(network, name): path for name in kohya_names(network, module)})
        if network == "unet":
            table = unet_table(UNetLayout.from_diffusers(list(modules)))
            for module, original in table.original_names(list(modules), "UNet").items():
                index[(network, "lora_unet_" + original.replace(".", "_"))] = modules[module]
    return index


def _delta(adapter: Adapter, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """scale-free ``alpha / r * up @ down`` in Flax kernel layout."""
    rank = adapter.rank
    up = adapter.up.reshape(adapter.up.shape[0], rank)
    down = adapter.down.reshape(rank, -1)
    delta = (up @ down) * (adapter.alpha / rank)  # (out, in * kh * kw)
    if len(kernel_shape) == 4:
        kh, kw, cin, cout = kernel_shape
        return delta.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0)
    return delta.T


def merge(params: dict[str, Any], adapters: list[Adapter], scale: float = 1.0, what: str = "LoRA") -> dict[str, Any]:
    """A copy of ``params`` ({"unet", "text_encoder", ...}) with every adapter merged at ``scale``."""
    absent = sorted({a.network for a in adapters} - set(params))
    if absent:
        raise CheckpointError(f"{what} adapts {', '.join(absent)}, which this model does not have (an SDXL LoRA "
                              "on an SD 1.x/2.x model, or one for the base on SDXL's refiner?).")
    index = _layer_index(params)
    flat = {network: traverse_util.flatten_dict(params[network]) for network in NETWORKS if network in params}
    missing, mismatched, updates = [], [], {}
    for a in adapters:
        path = index.get((a.network, a.module))
        if path is None:
            missing.append(f"{a.network}: {a.module}")
            continue
        kernel = flat[a.network][path]
        n_in = int(np.prod(kernel.shape[:-1]))
        if a.up.shape[0] != kernel.shape[-1] or int(np.prod(a.down.shape[1:])) != n_in:
            mismatched.append(f"{a.network}: {a.module}: LoRA {tuple(a.up.shape[:1]) + tuple(a.down.shape[1:])}, "
                              f"model kernel {tuple(kernel.shape)}")
            continue
        key = (a.network, path)
        updates[key] = updates.get(key, 0.0) + scale * _delta(a, tuple(kernel.shape))
    if missing or mismatched:
        lines = [f"{what} does not fit this model."]
        if missing:
            lines.append(f"  layers the model does not have ({len(missing)}):\n    " + "\n    ".join(missing[:20]))
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}), e.g. a LoRA for SD 1.x on SD 2.x or the other way "
                         "round:\n    " + "\n    ".join(mismatched[:20]))
        raise CheckpointError("\n".join(lines))
    out = dict(params)
    for network in flat:
        changed = {path: jnp.asarray(np.asarray(flat[network][path], np.float32) + delta, flat[network][path].dtype)
                   for (net, path), delta in updates.items() if net == network}
        if changed:
            out[network] = traverse_util.unflatten_dict({**flat[network], **changed})
    return out
