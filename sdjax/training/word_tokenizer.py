"""A small CLIP-format tokenizer folder for a text encoder trained from scratch on a closed vocabulary.

It keeps OpenAI CLIP's layout (the 256 byte symbols, the same with the end-of-word
marker ``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``), so
``sdjax.tokenizer.load_tokenizer`` and ``transformers.CLIPTokenizer`` read it and any text
still tokenizes. Merges spell each given word left to right; a word whose inner pair
is claimed by an earlier word's merge may come out as two or three pieces, which only
costs a token.
"""

import json
import os
from pathlib import Path
from typing import Iterable

from sdjax.tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _merges(words: Iterable[str]) -> list[tuple[str, str]]:
    merges: dict[tuple[str, str], None] = {}  # ordered, with constant-time membership
    for word in sorted({w.lower() for w in words}, key=lambda w: (-len(w), w)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merges.setdefault((left, right))
            left += right
    return list(merges)


def write_word_tokenizer(folder: str | Path, words: Iterable[str]) -> Path:
    """Writes vocab.json and merges.txt for ``words`` (lower-case ASCII) into ``folder``; returns it.
    Each file appears whole (written aside, then renamed): processes on one machine that write the same
    folder (a bucket workdir's local mirror) never read another's half-written file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = _merges(words)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    for name, text in (("vocab.json", json.dumps(vocab)), ("merges.txt", "\n".join(lines) + "\n")):
        tmp = folder / f"{name}.partial-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
    return folder
