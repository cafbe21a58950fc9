"""CLIP tokenizer: prompts -> fixed-length (77) token ids for the text encoder."""

import gzip
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from sdjax import paths

if TYPE_CHECKING:  # transformers takes seconds to import; only CLIP tokenizers need it
    from transformers import CLIPTokenizer

MAX_LENGTH = 77
_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's GPT-2/CLIP reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BPE_SUFFIX = ".txt.gz"


def folder_from_bpe(bpe_path: str, folder: str) -> str:
    """open_clip's vocabulary file (``bpe_simple_vocab_16e6.txt.gz``: a header line, then merges) as a
    CLIP tokenizer folder (vocab.json + merges.txt) with open_clip's ids: the 256 byte symbols, the same
    with ``</w>``, the first 48894 merges, then start and end of text."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2"] + merges) + "\n")
    return folder


def _tokenizer_dir(path: Path) -> Path | None:
    for folder in (path, path / "tokenizer"):
        if any(all((folder / f).is_file() for f in files) for files in _FILE_SETS):
            return folder
    return None


def load_tokenizer(path: str | Path) -> "CLIPTokenizer":
    """Load a CLIP tokenizer from a folder holding vocab.json + merges.txt (or tokenizer.json),
    from a diffusers model folder holding such a ``tokenizer/`` folder, or from open_clip's
    ``bpe_simple_vocab_16e6.txt.gz`` (padding with ``!``, id 0, as open_clip pads).

    The folder's ``tokenizer_config.json``, if any, sets the pad token (SD 1 pads with
    ``<|endoftext|>``, SD 2 with ``!``); the maximum length is always 77.
    """
    from transformers import CLIPTokenizer

    path = Path(paths.readable(os.fspath(path), "tokenizer"))
    if path.is_file() and path.name.endswith(BPE_SUFFIX):
        folder = folder_from_bpe(str(path), tempfile.mkdtemp(prefix="sdjax-tokenizer-"))
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH, pad_token="!")
    folder = _tokenizer_dir(path)
    if folder is None:
        raise FileNotFoundError(
            f"No CLIP tokenizer files in {path} or {path / 'tokenizer'}: expected vocab.json and merges.txt "
            f"(or tokenizer.json). Point to a diffusers model folder or its tokenizer/ subfolder.")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)


def tokenize(tokenizer: "CLIPTokenizer", prompts: Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Token ids (B, max_length) int32: BOS, the prompt, EOS, then padding.

    A prompt longer than ``max_length`` tokens is cut, keeping its final EOS, with a warning
    saying how many tokens were dropped.
    """
    if isinstance(prompts, str):
        raise TypeError("tokenize expects a list of prompts; wrap a single prompt as [prompt].")
    if not prompts:  # a host holding none of a padded batch's captions (transformers refuses an empty list)
        return np.zeros((0, max_length), np.int32)
    ids = tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
    out = np.full((len(ids), max_length), tokenizer.pad_token_id, np.int32)
    for b, (prompt, row) in enumerate(zip(prompts, ids)):
        if len(row) > max_length:
            warnings.warn(f"Prompt {b} is {len(row)} tokens long; the text encoder reads {max_length}, "
                          f"so {len(row) - max_length} tokens were dropped: {prompt!r}", stacklevel=2)
            row = row[:max_length - 1] + [tokenizer.eos_token_id]
        out[b, :len(row)] = row
    return out
