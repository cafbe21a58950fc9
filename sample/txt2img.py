"""Text2Img from the command line: the same as ``sdjax-txt2img`` (``sdjax/cli/sample.py``).

    python sample/txt2img.py --checkpoint CKPT --prompt "a photo of a cat" --n-samples 4 --out outputs
"""

from sdjax.cli.sample import txt2img

if __name__ == "__main__":
    txt2img()
