"""Img2Img from the command line.

    python sample/img2img.py --checkpoint CKPT --init-img in.png --strength 0.75 --prompt "an oil painting" --out outputs
"""

from sdjax.sample_cli import main

if __name__ == "__main__":
    main(img2img=True)
