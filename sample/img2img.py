"""Img2Img from the command line: the same as ``sdjax-img2img`` (``sdjax/cli/sample.py``).

    python sample/img2img.py --checkpoint CKPT --init-img in.png --strength 0.75 --prompt "an oil painting" \
        --out outputs
"""

from sdjax.cli.sample import img2img

if __name__ == "__main__":
    img2img()
