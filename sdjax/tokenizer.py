"""CLIP tokenizer: prompts -> fixed-length (77) token ids for the text encoder."""

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from transformers import CLIPTokenizer

from sdjax import paths

MAX_LENGTH = 77
_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _tokenizer_dir(path: Path) -> Path | None:
    for folder in (path, path / "tokenizer"):
        if any(all((folder / f).is_file() for f in files) for files in _FILE_SETS):
            return folder
    return None


def load_tokenizer(path: str | Path) -> CLIPTokenizer:
    """Load a CLIP tokenizer from a folder holding vocab.json + merges.txt (or tokenizer.json),
    or from a diffusers model folder holding such a ``tokenizer/`` folder.

    The folder's ``tokenizer_config.json``, if any, sets the pad token (SD 1 pads with
    ``<|endoftext|>``, SD 2 with ``!``); the maximum length is always 77.
    """
    path = Path(paths.readable(os.fspath(path), "tokenizer"))
    folder = _tokenizer_dir(path)
    if folder is None:
        raise FileNotFoundError(
            f"No CLIP tokenizer files in {path} or {path / 'tokenizer'}: expected vocab.json and merges.txt "
            f"(or tokenizer.json). Point to a diffusers model folder or its tokenizer/ subfolder.")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH)


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Token ids (B, max_length) int32: BOS, the prompt, EOS, then padding.

    A prompt longer than ``max_length`` tokens is cut, keeping its final EOS, with a warning
    saying how many tokens were dropped.
    """
    if isinstance(prompts, str):
        raise TypeError("tokenize expects a list of prompts; wrap a single prompt as [prompt].")
    ids = tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
    out = np.full((len(ids), max_length), tokenizer.pad_token_id, np.int32)
    for b, (prompt, row) in enumerate(zip(prompts, ids)):
        if len(row) > max_length:
            warnings.warn(f"Prompt {b} is {len(row)} tokens long; the text encoder reads {max_length}, "
                          f"so {len(row) - max_length} tokens were dropped: {prompt!r}", stacklevel=2)
            row = row[:max_length - 1] + [tokenizer.eos_token_id]
        out[b, :len(row)] = row
    return out
