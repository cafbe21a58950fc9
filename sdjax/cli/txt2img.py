"""``python -m sdjax.cli.txt2img`` = ``sdjax-txt2img`` (see ``sdjax.cli.sample``)."""

from sdjax.cli.sample import txt2img

if __name__ == "__main__":
    txt2img()
