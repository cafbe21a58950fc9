"""``python -m sdjax_demo`` = ``sdjax-demo``."""

from sdjax_demo.run import main

main()
