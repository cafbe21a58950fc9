"""LoRA adapters: read the layouts in circulation and merge them into a model's weights.

Layouts read (one ``.safetensors`` file; a folder holding ``pytorch_lora_weights.safetensors``):

    diffusers / PEFT   unet.<module>.lora_A.weight / lora_B.weight, text_encoder.<module>...; alpha and
                       rank from the file's ``lora_adapter_metadata`` (diffusers' save_lora_weights),
                       otherwise alpha = rank
    older diffusers    unet.<module>.lora.down.weight / lora.up.weight, attn processors'
                       ``processor.to_q_lora.down.weight``; optional ``<module>.alpha``
    kohya / A1111      lora_unet_<module with _>.lora_down.weight / lora_up.weight / alpha, lora_te_...

Targets: every linear or conv layer of the UNet and the text encoder (attention q/k/v/out,
transformer proj_in/proj_out, feed-forward, resnet convs: LoCon). The update
``W += scale * alpha / rank * up @ down`` is merged into the weights: sampling costs nothing
extra, and since the parameters are arguments of the compiled functions, a model with a LoRA
merged at any scale reuses them without recompiling.

Training (``LoraConfig``, used by the latent trainer's ``lora`` section): the adapters of the
UNet's ``targets`` are the only trained parameters; each step merges them into the frozen base
kernels (``apply_adapters``), or with ``dropout`` > 0 adds them beside the frozen layers
(``dropout_interceptor``, PEFT's lora_dropout), and ``save`` writes them in the diffusers/PEFT layout that
diffusers' ``load_lora_weights`` reads, or in kohya's.
"""

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from sdjax import paths
from sdjax.checkpoints import atomic
from sdjax.checkpoints.convert import CheckpointError, torch_key
from sdjax.models.layers import HeadsDense, HeadsMergeDense, features_to_heads, heads_to_features

NETWORKS = ("unet", "text_encoder")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
# Pairs (down, up) of each layout's key suffixes.
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
          (".lora_down.weight", ".lora_up.weight"))
_OTHER_ARCHITECTURES = (("text_encoder_2.", "SDXL"), ("lora_te2_", "SDXL"), ("lora_te1_", "SDXL"),
                        ("add_embedding", "SDXL"), ("transformer_blocks.0.ff_context", "SD 3 / Flux"),
                        ("single_transformer_blocks", "Flux"))
# SD 1.x/2.x LoRAs named after the original LDM modules rather than diffusers': not mapped yet.
_LDM_NAMED = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One low-rank update of one layer, in PyTorch layout."""
    network: str  # "unet" | "text_encoder"
    module: str  # the layer's PyTorch module name, e.g. "down_blocks.0.attentions.0.proj_in"
    down: np.ndarray  # (r, in) or (r, in, kh, kw)
    up: np.ndarray  # (out, r) or (out, r, 1, 1)
    alpha: float  # the update is scaled by alpha / r

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _lora_file(path: str) -> str:
    path = paths.check_local(os.path.expanduser(os.fspath(path)), "LoRA")
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LoRA file. Give a .safetensors file (or a folder holding "
                                f"{WEIGHT_NAME}).")
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: LoRAs are read from .safetensors files only (pickles can run code).")
    return path


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a valid safetensors file ({e}).") from e


def _peft_alphas(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per network: {"r", "lora_alpha", "rank_pattern", "alpha_pattern"} from diffusers' metadata."""
    if METADATA_KEY not in metadata:
        return {}
    packed = json.loads(metadata[METADATA_KEY])
    out: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        network, _, name = key.partition(".")
        out.setdefault(network, {})[name] = value
    return out


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for pattern, value in (patterns or {}).items():  # PEFT matches a pattern against the module name's end
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return default


def _split_network(key: str) -> tuple[str | None, str]:
    for prefix, network in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return network, key  # resolved against the model's module names later
    for network in NETWORKS:
        if key.startswith(network + "."):
            module = key[len(network) + 1:]
            return network, module.removeprefix("text_model.")
    return None, key


def read(path: str) -> list[Adapter]:
    """The adapters in a LoRA file; raises CheckpointError for layouts of other architectures and for
    keys that fit no layout."""
    path = _lora_file(path)
    tensors, metadata = _read(path)
    for marker, arch in _OTHER_ARCHITECTURES:
        if any(marker in k for k in tensors):
            raise CheckpointError(f"{path} is a LoRA for {arch} (keys like *{marker}*), not for Stable Diffusion "
                                  "1.x/2.x; it cannot be applied to this model.")
    if any(k.startswith(_LDM_NAMED) for k in tensors):
        raise CheckpointError(f"{path} names its UNet layers after the original LDM modules (lora_unet_input_blocks_*, "
                              "...); sdjax reads LoRAs named after diffusers' modules (lora_unet_down_blocks_*, or "
                              "the diffusers/PEFT layout). Convert it with kohya's tools or diffusers first.")
    peft = _peft_alphas(metadata)
    tensors = {re.sub(r"processor\.(to_[qkv]|to_out)_lora\.", lambda m: m.group(1).replace("to_out", "to_out.0")
                      + ".lora.", k): v for k, v in tensors.items()}
    adapters, used, unknown = [], set(), []
    for key in sorted(tensors):
        pair = next(((d, u) for d, u in _PAIRS if key.endswith(d)), None)
        if pair is None:
            continue
        stem = key[:-len(pair[0])]
        up_key = stem + pair[1]
        network, module = _split_network(stem)
        if network is None or up_key not in tensors:
            unknown.append(key)
            continue
        down, up = tensors[key].astype(np.float32), tensors[up_key].astype(np.float32)
        alpha_key = stem + ".alpha"
        if alpha_key in tensors:
            alpha = float(np.asarray(tensors[alpha_key]).reshape(-1)[0])
            used.add(alpha_key)
        elif network in peft:
            config = peft[network]
            rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", down.shape[0]))
            alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank)))
        else:
            alpha = float(down.shape[0])
        adapters.append(Adapter(network, module, down, up, alpha))
        used.update((key, up_key))
    unknown += [k for k in tensors if k not in used]
    if unknown:
        shown = "\n    ".join(sorted(unknown)[:20])
        raise CheckpointError(f"{path}: {len(unknown)} key(s) fit no LoRA layout sdjax reads (diffusers/PEFT lora_A/"
                              f"lora_B, lora.down/lora.up, kohya lora_down/lora_up/alpha):\n    {shown}")
    if not adapters:
        raise CheckpointError(f"{path} holds no LoRA weights.")
    return adapters


def _layer_index(params: dict[str, Any]) -> dict[tuple[str, str], tuple[str, ...]]:
    """(network, module name) -> Flax path of the layer's kernel, under PyTorch and kohya spellings."""
    index = {}
    for network in NETWORKS:
        for path in traverse_util.flatten_dict(params[network]):
            if path[-1] != "kernel":
                continue
            module = torch_key(path)[:-len(".weight")]
            index[(network, module)] = path
            kohya = ("lora_unet_" if network == "unet" else "lora_te_text_model_") + module.replace(".", "_")
            index[(network, kohya)] = path
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
    index = _layer_index(params)
    flat = {network: traverse_util.flatten_dict(params[network]) for network in NETWORKS}
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
    for network in NETWORKS:
        changed = {path: jnp.asarray(np.asarray(flat[network][path], np.float32) + delta, flat[network][path].dtype)
                   for (net, path), delta in updates.items() if net == network}
        if changed:
            out[network] = traverse_util.unflatten_dict({**flat[network], **changed})
    return out


# ---- training ---------------------------------------------------------------------------------------------

# The layers diffusers' LoRA training scripts adapt by default, plus the transformers' projections and
# feed-forward (PEFT ``target_modules``: suffixes of the PyTorch module names).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
LAYOUTS = ("peft", "kohya")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``config.lora`` of the latent trainer: ``rank`` > 0 trains UNet adapters instead of the UNet."""
    rank: int = 0  # 0: no LoRA, the whole UNet trains
    alpha: float | None = None  # the update is scaled by alpha / rank; None: alpha = rank
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module-name suffixes of the adapted layers
    dropout: float = 0.0  # PEFT's lora_dropout: dropout on each adapter's input (training only)
    layout: str = "peft"  # the export: peft (diffusers' load_lora_weights) or kohya (A1111, ComfyUI)

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0: no LoRA), got {self.rank}.")
        if self.layout not in LAYOUTS:
            raise ValueError(f"lora.layout={self.layout!r}; choose one of {', '.join(LAYOUTS)}.")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}.")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted layer (static, hashable)."""
    name: str  # the adapter's key in the trained params: the Flax path joined by "__"
    path: tuple[str, ...]  # the kernel's Flax path in the UNet params
    module: str  # the PyTorch module name (what LoRA files call the layer)
    kernel_shape: tuple[int, ...]


def find_targets(unet_params: Any, suffixes: tuple[str, ...]) -> tuple[Target, ...]:
    """The kernels of ``unet_params`` (arrays or ShapeDtypeStructs) whose module names end in one of
    ``suffixes``; a suffix that matches nothing is an error naming it."""
    found, unused = [], set(suffixes)
    for path, leaf in traverse_util.flatten_dict(unet_params).items():
        if path[-1] != "kernel":
            continue
        module = torch_key(path)[:-len(".weight")]
        hits = [t for t in suffixes if module == t or module.endswith("." + t)]
        if hits:
            unused -= set(hits)
            found.append(Target("__".join(path[:-1]), path, module, tuple(leaf.shape)))
    if unused:
        raise ValueError(f"lora.targets {sorted(unused)} match no layer of this UNet; targets are module-name "
                         f"suffixes such as {', '.join(DEFAULT_TARGETS)}.")
    return tuple(found)


def init_adapters(key: jax.Array, targets: tuple[Target, ...], rank: int) -> dict[str, dict[str, jax.Array]]:
    """Fresh adapters as PEFT makes them: ``down`` (r, in) uniform in +-1/sqrt(in) (kaiming-uniform with
    a = sqrt(5)), ``up`` (out, r) zero, so training starts from the base model."""
    out = {}
    for i, t in enumerate(targets):
        fan_in = int(np.prod(t.kernel_shape[:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        out[t.name] = {"down": jax.random.uniform(jax.random.fold_in(key, i), (rank, fan_in), jnp.float32, -bound, bound),
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


def trained_adapters(adapters: dict[str, dict[str, Any]], targets: tuple[Target, ...], alpha: float) -> list[Adapter]:
    """Trained adapters (host arrays) as ``Adapter``s of the UNet, in PyTorch layout (conv layers' 4-D)."""
    out = []
    for t in targets:
        down, up = np.asarray(adapters[t.name]["down"], np.float32), np.asarray(adapters[t.name]["up"], np.float32)
        if len(t.kernel_shape) == 4:  # a 1x1 conv: PEFT adapts it with conv adapters
            kh, kw, cin, _ = t.kernel_shape
            down = down.reshape(-1, kh, kw, cin).transpose(0, 3, 1, 2)
            up = up[:, :, None, None]
        out.append(Adapter("unet", t.module, down, up, alpha))
    return out


def save(folder: str, adapters: list[Adapter], layout: str = "peft") -> str:
    """Writes ``folder/pytorch_lora_weights.safetensors`` (what ``load_lora_weights(folder)`` reads):
    the diffusers/PEFT layout with diffusers' rank/alpha metadata, or kohya's (``lora_unet_*`` with
    an ``alpha`` per layer). Returns the file's path."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    tensors, metadata = {}, {"format": "pt"}
    for a in adapters:
        if layout == "peft":
            tensors[f"{a.network}.{a.module}.lora_A.weight"] = a.down
            tensors[f"{a.network}.{a.module}.lora_B.weight"] = a.up
        else:
            prefix = "lora_unet_" if a.network == "unet" else "lora_te_text_model_"
            name = prefix + a.module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = a.down
            tensors[f"{name}.lora_up.weight"] = a.up
            tensors[f"{name}.alpha"] = np.asarray(a.alpha, np.float32)
    if layout == "peft":
        packed = {}
        for network in sorted({a.network for a in adapters}):
            mine = [a for a in adapters if a.network == network]
            packed.update({f"{network}.r": mine[0].rank, f"{network}.lora_alpha": mine[0].alpha,
                           f"{network}.target_modules": sorted({a.module for a in mine})})
        metadata[METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    path = os.path.join(paths.check_local(os.fspath(folder), "LoRA export"), WEIGHT_NAME)
    with atomic.file(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
    return path
