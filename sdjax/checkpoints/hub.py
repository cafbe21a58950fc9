"""Hub ids, as diffusers and Colab users type them: ``org/name`` (a diffusers model repo) or
``org/name/FILE.safetensors`` (a single file in a repo), with ``@REVISION`` or ``revision=``.

They resolve through huggingface_hub: its cache, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` (then only the
cache is read) and ``revision``. Only the files sdjax reads are fetched (configs, tokenizer,
scheduler and the weights of the chosen ``variant`` in safetensors; PyTorch pickles only with
``allow_pickle``). A local path of the same name always wins over a hub id.
"""

import os
import re

from sdjax import paths

_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?P<file>(?:/[\w.-]+)*\.(?:safetensors|ckpt|pt|bin))?"
                 r"(?:@(?P<revision>[\w./-]+))?$")
_COMPONENTS = ("unet", "vae", "text_encoder")
_STEMS = ("diffusion_pytorch_model", "model")


def is_hub_id(path: str) -> bool:
    """Whether ``path`` reads as a hub id and names nothing local."""
    path = os.fspath(path)
    return not paths.is_remote(path) and not os.path.exists(os.path.expanduser(path)) and bool(_ID.match(path))


# What each kind of repo must hold, and the folders its weights are in ("" = the top level).
KINDS = {"pipeline": ("model_index.json", _COMPONENTS), "autoencoder": ("config.json", ("",))}


def _patterns(kind: str, variant: str | None, allow_pickle: bool) -> list[str]:
    suffix = f".{variant}" if variant else ""
    exts = ("safetensors", "bin") if allow_pickle else ("safetensors",)
    marker, folders = KINDS[kind]
    out = [marker, "scheduler/*.json", "tokenizer/*", "*/config.json"]
    for folder in folders:
        at = f"{folder}/" if folder else ""
        for stem in _STEMS:
            for ext in exts:
                out += [f"{at}{stem}{suffix}.{ext}", f"{at}{stem}{suffix}-*-of-*.{ext}",
                        f"{at}{stem}.{ext}.index{suffix}.json", f"{at}{stem}{suffix}.{ext}.index.json"]
    return out


def resolve(path: str, what: str, *, kind: str = "pipeline", revision: str | None = None,
            variant: str | None = None, allow_pickle: bool = False, default_file: str | None = None) -> str:
    """A local path for ``path``: itself when local, a copy of a ``gs://`` object, or the hub cache's
    snapshot of a hub id (fetched unless ``HF_HUB_OFFLINE``): a ``kind`` repo (``KINDS``), or
    ``default_file`` of the repo when the id names no file (a LoRA repo's weights). Raises one clear
    error when it is none of them."""
    path = os.fspath(path)
    if not is_hub_id(path):
        return paths.readable(path, what)
    import huggingface_hub
    from huggingface_hub import errors

    m = _ID.match(path)
    repo, file = m["repo"], (m["file"] or "").lstrip("/") or default_file or ""
    revision = revision or m["revision"]
    if file.endswith((".ckpt", ".pt", ".bin")) and not allow_pickle:
        raise ValueError(f"{what}={path} is a PyTorch pickle; pass allow_pickle=True (it is loaded weights-only) or "
                         "use the repo's .safetensors file.")
    try:
        if file:
            return huggingface_hub.hf_hub_download(repo, file, revision=revision)
        folder = huggingface_hub.snapshot_download(repo, revision=revision,
                                                   allow_patterns=_patterns(kind, variant, allow_pickle))
    except (errors.LocalEntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
            errors.EntryNotFoundError, OSError) as e:
        offline = " (HF_HUB_OFFLINE is set: only the local cache was searched)" if _offline() else ""
        raise FileNotFoundError(f"{what}={path}: no such local path, and not a hub model sdjax could fetch"
                                f"{offline}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    marker = KINDS[kind][0]
    if not os.path.isfile(os.path.join(folder, marker)):
        raise FileNotFoundError(f"{what}={path}: the hub repo has no {marker} (not a diffusers {kind}); for a "
                                f"single file in it pass {repo}/FILE.safetensors.")
    return folder


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
