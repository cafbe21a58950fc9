"""Writing exports so that a crash never leaves a half-written one at the destination.

Every writer fills a temporary sibling (``DEST.partial``) and swaps it in whole at the end;
an earlier export of the same kind at ``DEST`` is replaced, anything else there is refused. A
``gs://`` destination is filled locally and uploaded at the end, its marker files last
(``paths.upload``), so a reader never takes a half-uploaded export for a complete one.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterator

from sdjax import paths

# The files whose presence makes a folder an export of its kind (sdjax.json, model_index.json, ...).
MARKERS = ("sdjax.json", "vae.json", "model_index.json", "config.json")


def _refuse_other(path: str, is_same_kind: Callable[[str], bool], kind: str, local_view: str) -> None:
    if os.path.isdir(local_view) and os.listdir(local_view) and not is_same_kind(local_view):
        raise FileExistsError(f"{path} exists and is not {kind}; choose an empty or new directory "
                              "(an earlier export of the same kind is replaced).")


@contextlib.contextmanager
def folder(path: str, is_same_kind: Callable[[str], bool], kind: str) -> Iterator[str]:
    """Yields an empty temporary folder; when the block ends without an error it replaces ``path``."""
    path = paths.check(path, "export")
    if paths.is_remote(path):
        if paths.exists(path):
            shadow = paths.top_level_json(path)
            try:
                _refuse_other(path, is_same_kind, kind, shadow)
            finally:
                shutil.rmtree(shadow, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix="sdjax-export-")
        try:
            yield tmp
            paths.upload(tmp, path, last=MARKERS)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    path = os.path.abspath(path)
    _refuse_other(path, is_same_kind, kind, path)
    if os.path.isfile(path):
        raise FileExistsError(f"{path} is a file; an export of {kind} is a directory. Choose another path.")
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
    path = paths.check(path, "export")
    if paths.is_remote(path):
        tmp = tempfile.mkdtemp(prefix="sdjax-export-")
        try:
            name = os.path.join(tmp, os.path.basename(path))
            yield name
            paths.upload(name, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise FileExistsError(f"{path} is a directory; give a file name (e.g. model.safetensors).")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".partial"
    yield tmp
    os.replace(tmp, path)
