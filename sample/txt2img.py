"""Text2Img from the command line.

    python sample/txt2img.py --checkpoint CKPT --prompt "a photo of a cat" --n-samples 4 --out outputs
"""

from sdjax.sample_cli import main

if __name__ == "__main__":
    main()
