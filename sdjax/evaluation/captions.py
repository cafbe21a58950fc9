"""Captions to evaluate with: a captioned image folder's ``metadata.jsonl`` (the training folders'
format) or MLPerf's caption TSV (``val2014_30k.tsv``: tab-separated, a header row naming ``caption``
and usually ``id`` and ``image_id``)."""

import collections
import csv
import dataclasses
import json
import os

from sdjax import paths
from sdjax.data.image_folder import METADATA_FILE


@dataclasses.dataclass(frozen=True)
class Caption:
    """One caption and the name of its image (a file name in a folder; a TSV row's ``id``)."""
    name: str
    text: str


def from_metadata(folder: str) -> list[Caption]:
    """Each line of ``folder/metadata.jsonl`` (local or gs://); a malformed line is an error naming it."""
    meta = os.path.join(folder, METADATA_FILE)
    if paths.is_remote(meta):
        local = paths.readable(meta, "captions")
    elif os.path.isfile(meta):
        local = meta
    else:
        raise FileNotFoundError(f"{meta}: no such file. The CLIP score pairs each image with its caption: put a "
                                f'{METADATA_FILE} with lines {{"file_name": ..., "text": ...}} in the folder.')
    entries = []
    with open(local, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries.append(Caption(str(entry["file_name"]), str(entry["text"])))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f'{meta}, line {number}: expected {{"file_name": ..., "text": ...}}, got '
                                 f"{line.strip()[:200]!r}.") from None
    if not entries:
        raise ValueError(f"{meta} lists no images.")
    return entries


def from_tsv(path: str) -> list[Caption]:
    """The rows of a caption TSV with a header naming ``caption`` (MLPerf's ``id``, ``image_id`` and
    ``caption``); a row's name is its ``id``, or its number without one. Ids must be unique."""
    local = paths.readable(path, "captions")
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{path}: no such caption file (MLPerf's val2014_30k.tsv, or a TSV with a 'caption' "
                                "column).")
    with open(local, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if reader.fieldnames is None or "caption" not in reader.fieldnames:
            raise ValueError(f"{path}: a caption TSV starts with a tab-separated header naming a 'caption' column "
                             f"(MLPerf's val2014_30k.tsv: id, image_id, caption); got {reader.fieldnames}.")
        entries = []
        for number, row in enumerate(reader, 1):
            if row["caption"] is None:
                raise ValueError(f"{path}, row {number}: no caption column in {row}.")
            entries.append(Caption(str(row.get("id") or number), row["caption"]))
    if not entries:
        raise ValueError(f"{path} holds no captions.")
    counts = collections.Counter(c.name for c in entries)
    if len(counts) != len(entries):
        repeated = sorted(n for n, k in counts.items() if k > 1)[:5]
        raise ValueError(f"{path}: ids repeat ({', '.join(repeated)}); each caption names one image.")
    return entries


def read(path: str) -> list[Caption]:
    """A caption TSV, or a captioned folder's ``metadata.jsonl`` (the file, or a local folder holding it);
    local or gs://."""
    if os.path.isdir(path) or os.path.basename(path) == METADATA_FILE:
        return from_metadata(path if os.path.isdir(path) else os.path.dirname(path) or ".")
    return from_tsv(path)
