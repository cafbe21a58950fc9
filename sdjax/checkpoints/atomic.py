"""Writing exports so that a crash never leaves a half-written one at the destination.

Every writer fills a temporary sibling (``DEST.partial``) and swaps it in whole at the end;
an earlier export of the same kind at ``DEST`` is replaced, anything else there is refused.
"""

import contextlib
import os
import shutil
from typing import Callable, Iterator

from sdjax import paths


def _check_destination(path: str, is_same_kind: Callable[[str], bool], kind: str) -> str:
    path = os.path.abspath(paths.check_local(os.fspath(path), "export"))
    if os.path.isdir(path) and os.listdir(path) and not is_same_kind(path):
        raise FileExistsError(f"{path} exists and is not {kind}; choose an empty or new directory "
                              "(an earlier export of the same kind is replaced).")
    if os.path.isfile(path):
        raise FileExistsError(f"{path} is a file; an export of {kind} is a directory. Choose another path.")
    return path


@contextlib.contextmanager
def folder(path: str, is_same_kind: Callable[[str], bool], kind: str) -> Iterator[str]:
    """Yields an empty temporary folder; when the block ends without an error it replaces ``path``."""
    path = _check_destination(path, is_same_kind, kind)
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


@contextlib.contextmanager
def file(path: str) -> Iterator[str]:
    """Yields a temporary file name next to ``path``; when the block ends without an error it becomes ``path``."""
    path = os.path.abspath(paths.check_local(os.fspath(path), "export"))
    if os.path.isdir(path):
        raise FileExistsError(f"{path} is a directory; give a file name (e.g. model.safetensors).")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    yield tmp
    os.replace(tmp, path)
