"""Original (LDM / OpenCLIP) names against diffusers / transformers names, one table per network.

A ``Table`` lists (original, diffusers) pairs of module names; a tensor's key is renamed by the
longest pair that is a prefix of it (whole dot-separated parts), and both directions come from the
same pairs. What is not a rename is declared in the table too: 1x1-conv kernels the other side
stores as linear weights, and fused q/k/v projections. Block indices depend on the architecture,
so each network's table is built from its layout (``UNetLayout``, ``VAELayout``), which is read
from the keys of either side. Numpy only.
"""

import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np

from sdjax.checkpoints.errors import CheckpointError

RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
          ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))
VAE_RESNET = (("", ""), ("nin_shortcut", "conv_shortcut"))
VAE_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
OPEN_CLIP_BLOCK = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                   ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj"))
OPEN_CLIP_TOP = (("token_embedding", "text_model.embeddings.token_embedding"),
                 ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                 ("ln_final", "text_model.final_layer_norm"))


def indices(keys: Sequence[str], pattern: str) -> list[int]:
    """The sorted distinct integers the first group of ``pattern`` matches at the start of ``keys``."""
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def unknown_keys(what: str, keys: list[str]) -> CheckpointError:
    shown = "\n    ".join(sorted(keys)[:20])
    return CheckpointError(f"{what}: {len(keys)} key(s) do not fit the Stable Diffusion 1.x/2.x layout:\n    {shown}")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@dataclasses.dataclass(frozen=True)
class Table:
    """One network's names: (original, diffusers) module pairs, and what is stored differently.

    ``conv_as_linear``: diffusers modules whose ``weight`` is a linear (O, I) matrix where the
    original stores a 1x1 conv (O, I, 1, 1). ``fused``: original keys holding the diffusers keys
    listed beside them, concatenated along the first axis (OpenCLIP's ``in_proj`` = q, k, v).
    ``transposed``: diffusers keys whose matrix is the original's transposed (OpenCLIP's
    ``text_projection``, applied as ``x @ P``, against a linear layer's weight).
    """
    pairs: tuple[tuple[str, str], ...]
    conv_as_linear: frozenset[str] = frozenset()
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    transposed: frozenset[str] = frozenset()

    def to_diffusers(self, state: Mapping[str, np.ndarray], what: str, prefix: str = "") -> dict[str, np.ndarray]:
        """Original names -> diffusers names; keys the table does not cover raise, all listed (as
        ``prefix + key``: the name the file gives them)."""
        state, split = dict(state), {}
        for fused, parts in self.fused:
            if fused in state:
                value = state.pop(fused)
                if value.shape[0] % len(parts):
                    raise CheckpointError(f"{what}: {fused} of shape {value.shape} does not split in {len(parts)}.")
                split.update(zip(parts, np.split(value, len(parts), axis=0)))
        out = {**self._rename(state, dict(self.pairs), what, prefix), **split}
        out.update({key: np.ascontiguousarray(out[key].T) for key in self.transposed if key in out})
        for key in [k for k in out if k.rsplit(".", 1)[0] in self.conv_as_linear and k.endswith(".weight")]:
            value = out[key]
            if value.ndim > 2:
                if any(d != 1 for d in value.shape[2:]):
                    raise CheckpointError(f"{what}: {key} has a {value.shape[2:]} kernel; expected 1x1.")
                out[key] = value.reshape(value.shape[:2])
        return out

    def to_original(self, state: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        """Diffusers names -> original names; the inverse of ``to_diffusers``."""
        state = dict(state)
        state.update({key: np.ascontiguousarray(state[key].T) for key in self.transposed if key in state})
        for key in [k for k in state if k.rsplit(".", 1)[0] in self.conv_as_linear and k.endswith(".weight")]:
            if state[key].ndim == 2:
                state[key] = state[key][:, :, None, None]
        fused_out = {}
        for fused, parts in self.fused:
            if all(p in state for p in parts):
                fused_out[fused] = np.concatenate([state.pop(p) for p in parts])
        return {**self._rename(state, {d: o for o, d in self.pairs}, what), **fused_out}

    def original_names(self, names: Sequence[str], what: str) -> dict[str, str]:
        """diffusers module (or tensor) names -> the original ones."""
        renamed = self._rename({n: n for n in names}, {d: o for o, d in self.pairs}, what)
        return {name: original for original, name in renamed.items()}

    @staticmethod
    def _rename(state: Mapping[str, np.ndarray], names: dict[str, str], what: str, prefix: str = ""
                ) -> dict[str, np.ndarray]:
        out, unknown = {}, []
        for key, value in state.items():
            parts = key.split(".")
            for k in range(len(parts), 0, -1):
                module = ".".join(parts[:k])
                if module in names:
                    out[_join(names[module], ".".join(parts[k:]))] = value
                    break
            else:
                unknown.append(prefix + key)
        if unknown:
            raise unknown_keys(what, unknown)
        return out


# ---- the UNet ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UNetLayout:
    """What the UNet's block indices depend on: resnets per down level, which levels attend, and
    whether it has SDXL's added embedding (``label_emb``, diffusers' ``add_embedding``)."""
    layers_per_block: int
    down_attention: tuple[bool, ...]  # per level, outermost first
    up_attention: tuple[bool, ...]  # per up level, innermost first (diffusers' order)
    added_embedding: bool = False

    @classmethod
    def from_original(cls, keys: Sequence[str]) -> "UNetLayout":
        """From LDM ``UNetModel`` keys (``model.diffusion_model.`` removed)."""
        keys = list(keys)
        downsamplers = indices(keys, r"input_blocks\.(\d+)\.0\.op\.")
        blocks = indices(keys, r"input_blocks\.(\d+)\.")
        layers = downsamplers[0] - 1 if downsamplers else len(blocks) - 1  # one level: no downsampling
        per = layers + 1
        levels = (max(blocks, default=0) - layers) // per + 1
        down = tuple(any(k.startswith(f"input_blocks.{1 + level * per}.1.") for k in keys) for level in range(levels))
        up = tuple(any(k.startswith(f"output_blocks.{level * per}.1.") and ".1.conv." not in k for k in keys)
                   for level in range(levels))
        return cls(layers, down, up, any(k.startswith("label_emb.") for k in keys))

    @classmethod
    def from_diffusers(cls, keys: Sequence[str]) -> "UNetLayout":
        """From ``UNet2DConditionModel`` keys."""
        keys = list(keys)
        levels = indices(keys, r"down_blocks\.(\d+)\.")
        has = lambda side, level: any(k.startswith(f"{side}.{level}.attentions.") for k in keys)  # noqa: E731
        return cls(len(indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")),
                   tuple(has("down_blocks", level) for level in levels),
                   tuple(has("up_blocks", level) for level in levels),
                   any(k.startswith("add_embedding.") for k in keys))


def unet_table(layout: UNetLayout) -> Table:
    """LDM ``openaimodel.UNetModel`` against diffusers ``UNet2DConditionModel`` (neither side's prefix)."""
    levels, per = len(layout.down_attention), layout.layers_per_block + 1
    pairs = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
             ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")]
    if layout.added_embedding:
        pairs += [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]

    def resnet(original: str, diffusers: str) -> list[tuple[str, str]]:
        return [(f"{original}.{o}", f"{diffusers}.{d}") for o, d in RESNET]

    for level in range(levels):
        for j in range(layout.layers_per_block):
            block = 1 + level * per + j
            pairs += resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}")
            if layout.down_attention[level]:
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}"))
        if level < levels - 1:
            pairs.append((f"input_blocks.{(level + 1) * per}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
    pairs += resnet("middle_block.0", "mid_block.resnets.0") + [("middle_block.1", "mid_block.attentions.0")]
    pairs += resnet("middle_block.2", "mid_block.resnets.1")
    for level in range(levels):
        for j in range(per):  # an up level has one resnet more than a down level
            block = level * per + j
            pairs += resnet(f"output_blocks.{block}.0", f"up_blocks.{level}.resnets.{j}")
            if layout.up_attention[level]:
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{level}.attentions.{j}"))
        if level < levels - 1:  # LDM's Upsample follows the level's last resnet (slot 1) or its attention (slot 2)
            slot = 2 if layout.up_attention[level] else 1
            pairs.append((f"output_blocks.{level * per + per - 1}.{slot}.conv", f"up_blocks.{level}.upsamplers.0.conv"))
    return Table(tuple(pairs))


# ---- the autoencoder --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VAELayout:
    levels: int
    encoder_layers: int  # resnets per encoder level (the decoder's levels have one more)

    @classmethod
    def from_original(cls, keys: Sequence[str]) -> "VAELayout":
        return cls(len(indices(list(keys), r"encoder\.down\.(\d+)\.")),
                   len(indices(list(keys), r"encoder\.down\.0\.block\.(\d+)\.")))

    @classmethod
    def from_diffusers(cls, keys: Sequence[str]) -> "VAELayout":
        return cls(len(indices(list(keys), r"encoder\.down_blocks\.(\d+)\.")),
                   len(indices(list(keys), r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")))


def vae_table(layout: VAELayout) -> Table:
    """LDM ``AutoencoderKL`` against diffusers ``AutoencoderKL``. LDM counts decoder levels from the
    lowest resolution up, diffusers from the top; the mid-block attention's projections are 1x1 convs
    in LDM and linear layers in diffusers."""
    n = layout.levels
    pairs = [(name, name) for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                       "quant_conv", "post_quant_conv")]
    pairs += [("encoder.norm_out", "encoder.conv_norm_out"), ("decoder.norm_out", "decoder.conv_norm_out")]

    def resnet(original: str, diffusers: str) -> list[tuple[str, str]]:
        return [(_join(original, o), _join(diffusers, d)) for o, d in VAE_RESNET]

    for level in range(n):
        for j in range(layout.encoder_layers):
            pairs += resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}")
        for j in range(layout.encoder_layers + 1):
            pairs += resnet(f"decoder.up.{n - 1 - level}.block.{j}", f"decoder.up_blocks.{level}.resnets.{j}")
        if level < n - 1:
            pairs.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv"))
            pairs.append((f"decoder.up.{n - 1 - level}.upsample.conv", f"decoder.up_blocks.{level}.upsamplers.0.conv"))
    linear = set()
    for part in ("encoder", "decoder"):
        pairs += resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        pairs += resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        for o, d in VAE_ATTENTION:
            pairs.append((f"{part}.mid.attn_1.{o}", f"{part}.mid_block.attentions.0.{d}"))
            if o != "norm":
                linear.add(f"{part}.mid_block.attentions.0.{d}")
    return Table(tuple(pairs), conv_as_linear=frozenset(linear))


# ---- OpenCLIP text towers ---------------------------------------------------------------------------------

def open_clip_table(layers: int, projection: bool = False) -> Table:
    """An OpenCLIP text tower's first ``layers`` resblocks against ``CLIPTextModel`` names, q/k/v
    fused in OpenCLIP's ``attn.in_proj``; with ``projection``, its ``text_projection`` against
    ``CLIPTextModelWithProjection``'s (SDXL's ViT-bigG)."""
    pairs = list(OPEN_CLIP_TOP)
    fused = []
    for n in range(layers):
        block, layer = f"transformer.resblocks.{n}", f"text_model.encoder.layers.{n}"
        pairs += [(f"{block}.{o}", f"{layer}.{d}") for o, d in OPEN_CLIP_BLOCK]
        for leaf in ("weight", "bias"):
            fused.append((f"{block}.attn.in_proj_{leaf}", tuple(f"{layer}.self_attn.{x}_proj.{leaf}" for x in "qkv")))
    transposed = frozenset()
    if projection:
        pairs.append(("text_projection", "text_projection.weight"))
        transposed = frozenset({"text_projection.weight"})
    return Table(tuple(pairs), fused=tuple(fused), transposed=transposed)
