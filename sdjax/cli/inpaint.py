"""``python -m sdjax.cli.inpaint`` = ``sdjax-inpaint`` (see ``sdjax.cli.sample``)."""

from sdjax.cli.sample import inpaint

if __name__ == "__main__":
    inpaint()
