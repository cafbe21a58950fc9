"""``python -m sdjax.cli.img2img`` = ``sdjax-img2img`` (see ``sdjax.cli.sample``)."""

from sdjax.cli.sample import img2img

if __name__ == "__main__":
    img2img()
