"""sdjax's command lines (console scripts ``sdjax-txt2img``, ``sdjax-img2img``, ``sdjax-train``);
``sample/*.py`` and ``train/*.py`` in a checkout are thin wrappers around them."""

import gc
from typing import Sequence

# A young-generation collection after every 10,000 new container objects, not Python's 700: tracing a
# model allocates them by the million, and at 700 a command spends a large share of its CPU in the
# collector. The older generations keep their default ratios (each after 10 of the one below).
COMMAND_GC_THRESHOLD = (10_000, 10, 10)


def tune_gc(argv: Sequence[str] | None) -> None:
    """The cyclic collector's thresholds for a command's own process (``argv`` None: the command line
    started it); a command called from Python (tests, notebooks) leaves the caller's settings alone."""
    if argv is None:
        gc.set_threshold(*COMMAND_GC_THRESHOLD)
