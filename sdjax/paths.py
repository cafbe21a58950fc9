"""Paths sdjax reads and writes: local ones and Cloud Storage (``gs://``); other URLs are refused.

Readers that need a local file (safetensors, tokenizers, images) read a ``gs://`` file or folder
through ``readable``, which copies it once into ``~/.cache/sdjax/gs`` (``SDJAX_CACHE`` moves it);
writers fill a local folder and upload it whole (``upload``). Orbax checkpoints, metrics and
webdataset shards go to the bucket directly. Credentials are the standard Google ones (a TPU VM's
service account); with ``STORAGE_EMULATOR_HOST=http://HOST:PORT`` set, every gs:// access goes to
that emulator instead, without credentials, as Google's own clients do.
"""

import glob as glob_lib
import os
import re
import shutil
import tempfile

GCS = "gs://"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

def _use_emulator() -> None:
    """Points TensorStore (Orbax's array writer, which reads its own variable) at the emulator that
    ``STORAGE_EMULATOR_HOST`` names, and turns off gcsfs's bucket-type probe (an API emulators lack)."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = os.environ["STORAGE_EMULATOR_HOST"]
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def is_remote(path: str) -> bool:
    return str(path).startswith(GCS)


def check(path: str, what: str) -> str:
    """``path`` with ``~`` expanded (config values reach sdjax unexpanded by a shell); a ``gs://``
    path as it is; any other URL (s3://, http://, ...) refused with a clear error."""
    path = os.fspath(path)
    if is_remote(path):
        _use_emulator()
        if len(path) <= len(GCS) or path[len(GCS)] == "/":
            raise ValueError(f"{what}={path}: a Cloud Storage path is gs://BUCKET/PATH.")
        return path.rstrip("/")
    if _URL.match(path):
        raise ValueError(f"{what}={path}: sdjax reads and writes local paths and gs:// only. Copy the data to "
                         "Cloud Storage or mount the store (e.g. with a FUSE driver) and pass the mounted path.")
    return os.path.expanduser(path)


def check_local(path: str, what: str, instead: str = "") -> str:
    """``check``, for a path that must be on this host's file system (``instead``: what to do for data
    in a bucket)."""
    path = check(path, what)
    if is_remote(path):
        raise ValueError(f"{what}={path} must be a local path{': ' + instead if instead else '.'}")
    return path


def expand_fields(obj, section: str, names: tuple[str, ...], local: dict[str, str] | None = None) -> None:
    """``check`` on the path fields ``names`` of a frozen dataclass that are set, in place; those in
    ``local`` (name -> what to do instead) must be local."""
    for name in names:
        if getattr(obj, name) is not None:
            what = f"{section}.{name}"
            value = (check_local(getattr(obj, name), what, local[name]) if local and name in local
                     else check(getattr(obj, name), what))
            object.__setattr__(obj, name, value)


def _fs():
    _use_emulator()
    import gcsfs  # noqa: F401 - registers the gs protocol's implementation
    import fsspec

    return fsspec.filesystem("gs")


def exists(path: str) -> bool:
    """Whether a local or ``gs://`` path exists."""
    return _fs().exists(path) if is_remote(path) else os.path.exists(path)


def remove(path: str) -> None:
    """Deletes a local or ``gs://`` file or folder."""
    if is_remote(path):
        _fs().rm(path, recursive=True)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def makedirs(path: str) -> None:
    """A local folder and its parents (a bucket has no folders to make)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def glob(pattern: str) -> list[str]:
    """The sorted local or ``gs://`` paths matching ``pattern``."""
    if is_remote(pattern):
        return sorted(GCS + p for p in _fs().glob(pattern))
    return sorted(glob_lib.glob(pattern))


def _cache_root() -> str:
    return os.path.join(os.environ.get("SDJAX_CACHE", os.path.expanduser("~/.cache/sdjax")), "gs")


def mirror(path: str) -> str:
    """The local folder standing for ``gs://`` ``path`` (where ``readable`` copies it)."""
    return os.path.join(_cache_root(), path[len(GCS):])


def readable(path: str, what: str) -> str:
    """A local path holding ``path``: itself when local; a ``gs://`` file or folder copied into the
    cache first (files already there with the same size are kept). Raises when it does not exist."""
    path = check(path, what)
    if not is_remote(path):
        return path
    fs = _fs()
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}={path}: no such object or folder in the bucket.") from None
    except Exception as e:  # noqa: BLE001 - the client raises its own types for auth and network errors
        raise OSError(f"{what}={path}: cannot read it ({type(e).__name__}: {e}). Check the path and that this "
                      "host's credentials may read the bucket.") from e
    local = mirror(path)
    if info["type"] == "file":
        _fetch(fs, path, local, info)
        return local
    for remote, meta in fs.find(path, detail=True).items():
        _fetch(fs, GCS + remote, os.path.join(local, os.path.relpath(remote, path[len(GCS):])), meta)
    return local


def _version(info: dict) -> str:
    """What identifies an object's content: its generation (a new one on every write) and checksum."""
    return f"{info.get('generation')}:{info.get('crc32c') or info.get('md5Hash')}:{info.get('size')}"


def _fetch(fs, remote: str, local: str, info: dict) -> None:
    """``remote`` to ``local`` unless the copy there is of the same object version (a sidecar records it)."""
    stamp = os.path.join(_cache_root() + "-versions", os.path.relpath(local, _cache_root()))
    if os.path.isfile(local) and os.path.isfile(stamp):
        with open(stamp) as f:
            if f.read() == _version(info):
                return
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.partial-{os.getpid()}"
    fs.get_file(remote, tmp)
    os.replace(tmp, local)
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as f:
        f.write(_version(info))


def upload(local: str, path: str, last: tuple[str, ...] = ()) -> None:
    """Copies the local file or folder ``local`` to ``gs://`` ``path`` (a folder's old objects are
    removed first). Files named in ``last`` go up after every other, so a reader that looks for
    them (an export's marker) never sees a half-uploaded folder as complete."""
    fs = _fs()
    if os.path.isfile(local):
        fs.put_file(local, path)
        return
    if fs.exists(path):
        fs.rm(path, recursive=True)
    files = sorted(os.path.relpath(os.path.join(root, f), local) for root, _, names in os.walk(local) for f in names)
    files.sort(key=lambda f: f in last)
    for f in files:
        fs.put_file(os.path.join(local, f), f"{path}/{f}")


def top_level_json(path: str) -> str:
    """A local folder mirroring the top level of ``gs://`` folder ``path``: its JSON files copied, every
    other entry an empty placeholder (what deciding an export's kind by its marker files needs)."""
    fs, shadow = _fs(), tempfile.mkdtemp(prefix="sdjax-shadow-")
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        target = os.path.join(shadow, name)
        if entry["type"] == "directory":
            os.makedirs(target, exist_ok=True)
        elif name.endswith(".json"):
            fs.get_file(entry["name"], target)
        else:
            open(target, "wb").close()
    return shadow
