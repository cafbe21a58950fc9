"""Errors a user causes (a bad path, checkpoint or value) end a command with one ``error: ...``
line on stderr and exit status 2, without a traceback; ``SDJAX_TRACEBACK=1`` shows it anyway.

A ValueError or OSError counts as the user's when sdjax itself raised it (its innermost frame
is in the sdjax package); one raised deep inside a dependency keeps its traceback, which a
bug report needs.
"""

import contextlib
import os
import sys
import traceback
from typing import Iterator

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raised_by_sdjax(e: BaseException) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PACKAGE_DIR + os.sep)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except (ValueError, OSError) as e:
        if os.environ.get("SDJAX_TRACEBACK") or not _raised_by_sdjax(e):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
