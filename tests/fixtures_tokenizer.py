"""A tiny CLIP-style byte-level BPE tokenizer folder (vocab.json + merges.txt) built offline.

The layout follows OpenAI CLIP's vocabulary: the 256 byte symbols, the same with the
end-of-word marker ``</w>``, one entry per merge, then ``<|startoftext|>`` and
``<|endoftext|>``.
"""

import json
from pathlib import Path

from sdjax.training.word_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Merges spell out a few whole words, so "a photo of a cat" is 7 tokens with BOS/EOS.
MERGES = [
    ("o", "f</w>"), ("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"),
    ("t", "o</w>"), ("pho", "to</w>"), ("d", "o"), ("do", "g</w>"),
]


def vocabulary() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(folder: Path, tokenizer_config: dict | None = None) -> Path:
    """Write vocab.json, merges.txt and optionally tokenizer_config.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocabulary()), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in MERGES]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return folder
