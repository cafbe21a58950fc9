"""Paths sdjax reads and writes: local file systems (a mounted bucket included), not URLs."""

import os
import re

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_local(path: str, what: str) -> str:
    """``path`` with ``~`` expanded (config values reach sdjax unexpanded by a shell); refuses a URL
    (gs://, s3://, ...) with a clear error instead of letting it become a local folder named ``gs:``."""
    if _URL.match(str(path)):
        raise ValueError(f"{what}={path}: sdjax reads and writes local paths only. Mount the bucket (e.g. "
                         "`gcsfuse BUCKET /mnt/BUCKET` on every host) and pass the mounted path.")
    return os.path.expanduser(path)


def expand_fields(obj, section: str, names: tuple[str, ...]) -> None:
    """``check_local`` on the path fields ``names`` of a frozen dataclass that are set, in place."""
    for name in names:
        if getattr(obj, name) is not None:
            object.__setattr__(obj, name, check_local(getattr(obj, name), f"{section}.{name}"))
