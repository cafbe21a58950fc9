"""Training from the command line (``sdjax-train``; ``train/*.py`` in a checkout)::

    sdjax-train autoencoder --config tiny_autoencoder --workdir runs/vae --export runs/vae-export
    sdjax-train latent --config tiny --workdir runs/ldm --config.autoencoder.path=runs/vae-export

``--config`` takes the name of a config shipped in ``sdjax/configs`` or a file's path, either
followed by ``:ARG`` (a variant: ``sd15_finetune:tiny``); any value is overridden with
``--config.SECTION.KEY=VALUE``. Re-running the same command in the same ``--workdir`` resumes
from its latest checkpoint. Multi-host: set SDJAX_COORDINATOR=host:port, SDJAX_NUM_PROCESSES
and SDJAX_PROCESS_ID on each process (or SDJAX_DISTRIBUTED=auto on TPU pods).
"""

import functools
import importlib.util
import sys
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from sdjax import configs as configs_lib
from sdjax.cli import tune_gc
from sdjax.cli.errors import user_errors

PHASES = ("autoencoder", "latent", "encode")
USAGE = ("usage: sdjax-train {autoencoder,latent} --config NAME_OR_PATH[:ARG] --workdir DIR [--export DIR "
         "[--export-format FMT]] [--config.SECTION.KEY=VALUE ...]\n"
         "       sdjax-train encode --config NAME_OR_PATH[:ARG] --out DIR [--config.SECTION.KEY=VALUE ...]")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A shipped config's name (e.g. tiny) or a config file's path, optionally followed by :ARG.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and samples (re-run to resume).")
_EXPORT = flags.DEFINE_string("export", None, "Write the trained model here when training ends: the autoencoder "
                                              "phase writes what the latent phase's autoencoder.path reads; the "
                                              "latent phase a model StableDiffusion.from_pretrained loads.")
_OUT = flags.DEFINE_string("out", None, "encode: the folder (local or gs://) the latent shards go to.")
_EXPORT_FORMAT = flags.DEFINE_enum(
    "export-format", None, ["sdjax", "diffusers", "single_file"],
    "Format of --export (default sdjax): diffusers writes a diffusers folder (the autoencoder phase: an AutoencoderKL "
    "folder), single_file one original-layout .safetensors file (latent phase only).")


def _prepare_argv(argv: list[str]) -> list[str]:
    """Resolves --config's name to a path and checks every --config.KEY override exists, so a typo is
    one clear error before anything runs (absl would fail later with a bare AttributeError)."""
    out, spec = list(argv), None
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            spec = out[i + 1] = configs_lib.resolve(out[i + 1])
        elif a.startswith("--config="):
            spec = configs_lib.resolve(a.split("=", 1)[1])
            out[i] = "--config=" + spec
    if spec is None:
        raise ValueError(f"--config is required.\n{USAGE}")
    overrides = [a[len("--config."):].split("=", 1)[0] for a in out if a.startswith("--config.")]
    if overrides:
        config = configs_lib.load(spec)
        for key in overrides:
            configs_lib.check_override(config, key)
    return out


def _run(phase: str, argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}.\n{USAGE}")
    if phase == "encode" and not _OUT.value:
        raise app.UsageError(f"--out is required.\n{USAGE}")
    if phase != "encode" and not _WORKDIR.value:
        raise app.UsageError(f"--workdir is required.\n{USAGE}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    from sdjax import sharding
    from sdjax.training import preemption
    sharding.initialize_distributed()
    config = _CONFIG.value
    if _EXPORT.value:
        config.train.export_dir = _EXPORT.value
    if _EXPORT_FORMAT.value:
        config.train.export_format = _EXPORT_FORMAT.value
    with user_errors():
        if phase == "encode":
            from sdjax.training import latent
            latent.encode(config, _OUT.value)
            return
        if phase == "autoencoder":
            from sdjax.training import autoencoder as trainer
        else:
            from sdjax.training import latent as trainer
        try:
            trainer.train(config, _WORKDIR.value)
        except preemption.Preempted as e:  # the checkpoint is complete; the same command resumes it
            print(e, flush=True)
            raise SystemExit(PREEMPTED_EXIT) from None


TRAIN_PACKAGES = ("tensorflow_datasets", "grain", "array_record")
PREEMPTED_EXIT = 143  # 128 + SIGTERM, as a shell reports a process the signal ended


def main(argv: Sequence[str] | None = None, phase: str | None = None) -> None:
    """``sdjax-train PHASE ...``; ``phase`` given: the rest of the command line is that phase's."""
    tune_gc(argv)
    missing = [name for name in TRAIN_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"error: training reads its data with {', '.join(missing)}, which this installation "
                         "lacks: pip install 'sdjax[train]'.")
    argv = list(sys.argv if argv is None else argv)
    if phase is None:
        if len(argv) < 2 or argv[1] not in PHASES:
            raise SystemExit(f"error: the first argument must be the phase, one of {', '.join(PHASES)}.\n{USAGE}")
        phase = argv.pop(1)
    with user_errors():
        argv = _prepare_argv(argv)
    app.run(functools.partial(_run, phase), argv=argv)


if __name__ == "__main__":
    main()
