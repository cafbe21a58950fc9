"""A small folder of captioned images as users bring them: images of several sizes and formats,
metadata.jsonl, one corrupt image, one entry without a caption and one malformed line."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from sdjax.data import caption, render_shape


def write_image_folder(folder: Path, n: int) -> Path:
    """``n`` good images (captioned shapes, 40x40 PNGs and 48x32 JPEGs), plus the bad entries."""
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        s, c, bg = i % 3, i % 6, (i + 1) % 6
        if i % 2:
            Image.fromarray(render_shape(s, c, bg, 16, 20, 20, 40)).save(folder / f"{i:03d}.png")
            lines.append({"file_name": f"{i:03d}.png", "text": caption(s, c, bg)})
        else:
            wide = np.concatenate([render_shape(s, c, bg, 12, 16, 16, 32)] * 2, axis=1)[:, 8:56]
            Image.fromarray(np.ascontiguousarray(wide)).save(folder / f"{i:03d}.jpg", quality=95)
            lines.append({"file_name": f"{i:03d}.jpg", "text": caption(s, c, bg)})
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines.append({"file_name": "corrupt.png", "text": "a red circle on a blue background"})
    Image.fromarray(render_shape(0, 0, 1, 16, 20, 20, 40)).save(folder / "nocaption.png")
    lines.append({"file_name": "nocaption.png"})
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
    (folder / "metadata.jsonl").write_text(text)
    return folder
