"""Captioned images from a local folder in the Hugging Face image-folder layout.

The folder holds the images and a `metadata.jsonl` with one line per example,
`{"file_name": "cat.png", "text": "a cat on a mat"}`, file names relative to the folder.
Unreadable or truncated images, entries without a caption and malformed lines are
skipped and counted, never fatal: a summary is printed once the split is written.

A folder is prepared under a builder config named after its contents (the metadata file and
every file's name and size), so a changed folder is prepared anew instead of being read stale,
and hosts holding copies of the same folder prepare the same dataset.
"""

import collections
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds
from PIL import Image

METADATA_FILE = "metadata.jsonl"


def check_folder(folder: str | Path) -> Path:
    """Returns the folder as a Path, or raises if it cannot be an image folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.manual_dir={folder}: no such folder. Give the folder holding your images and "
                                f"a {METADATA_FILE}.")
    if not (folder / METADATA_FILE).is_file():
        raise FileNotFoundError(
            f"{folder / METADATA_FILE} not found: captioned_images reads a folder of images plus a "
            f'{METADATA_FILE} with lines {{"file_name": ..., "text": ...}}; pass that folder as manual_dir.')
    return folder


def _rgb_image_bytes(path: Path) -> bytes:
    """Decodes the whole image (so truncation shows) and returns bytes PIL decodes to RGB."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.format in ("JPEG", "PNG") and img.mode == "RGB":
            return data  # Keep the original encoding: no recompression loss.
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()


def folder_config(folder: str | Path) -> tfds.core.BuilderConfig:
    """The builder config of ``folder``: named after a digest of its contents."""
    folder = check_folder(folder)
    digest = hashlib.sha256((folder / METADATA_FILE).read_bytes())
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(f"{os.path.relpath(path, folder)}\0{os.path.getsize(path)}\0".encode())
    return tfds.core.BuilderConfig(name=f"folder_{digest.hexdigest()[:16]}",
                                   description=f"Images and captions of {folder}.")


class _Skipped:
    """Counts skipped entries by reason, with the names of the skipped files."""

    _LABELS = {"unreadable": ("unreadable image", "unreadable images"),
               "no_caption": ("entry without caption", "entries without caption"),
               "malformed": ("malformed metadata line", "malformed metadata lines")}

    def __init__(self):
        self.names = collections.defaultdict(list)

    def add(self, reason: str, name: str):
        self.names[reason].append(name)

    def summary(self, num_prepared: int) -> str:
        parts = [f"{len(names)} {self._LABELS[reason][len(names) > 1]} ({', '.join(names)})"
                 for reason in self._LABELS if (names := self.names[reason])]
        return f"prepared {num_prepared} examples; skipped {', '.join(parts) or 'nothing'}"


class CaptionedImages(tfds.core.GeneratorBasedBuilder):
    """A local folder of images with captions in metadata.jsonl (Hugging Face image folder)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images and captions from a local image folder."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put the images and a {METADATA_FILE} (one JSON object per line with 'file_name' and "
        "'text') in one folder and pass it as the manual dir.")
    # tfds looks for download checksums beside the code through `importlib_resources`, which
    # it only installs on Python < 3.9; this builder downloads nothing, so skip the lookup.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "text": tfds.features.Text(),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "text"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(check_folder(dl_manager.manual_dir))}

    def _generate_examples(self, folder: Path) -> Iterator[tuple[int, dict]]:
        skipped, num_prepared = _Skipped(), 0
        with open(folder / METADATA_FILE, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    name = entry["file_name"]
                except (json.JSONDecodeError, TypeError, KeyError):
                    skipped.add("malformed", f"line {line_no}")
                    continue
                text = entry.get("text")
                if not isinstance(text, str) or not text.strip():
                    skipped.add("no_caption", name)
                    continue
                try:
                    image = _rgb_image_bytes(folder / name)
                except Exception:  # noqa: BLE001 - PIL raises many types on bad files; none may stop the run.
                    skipped.add("unreadable", name)
                    continue
                num_prepared += 1
                yield line_no, {"image": image, "text": text, "file_name": name}
        print(skipped.summary(num_prepared))
