"""Inpainting from the command line: the same as ``sdjax-inpaint`` (``sdjax/cli/sample.py``).

    python sample/inpaint.py --checkpoint CKPT --init-img photo.png --mask mask.png --prompt "a red sofa" --out outputs
"""

from sdjax.cli.sample import inpaint

if __name__ == "__main__":
    inpaint()
