"""Phase 1: train the perceptual KL autoencoder (L1 + LPIPS + KL + PatchGAN), then export it.

    python train/autoencoder.py --config configs/tiny_autoencoder.py --workdir /tmp/sdjax_vae [--export DIR]

Re-running with the same --workdir resumes from its latest checkpoint. The export (``--export``
or ``train.export_dir``) is what ``train/latent.py`` takes as ``--config.autoencoder.path``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from sdjax import sharding
from sdjax.training import autoencoder

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reconstructions.")
_EXPORT = flags.DEFINE_string("export", None, "Write the trained autoencoder here (an autoencoder export that train/latent.py reads).")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    sharding.initialize_distributed()
    config = _CONFIG.value
    if _EXPORT.value:
        config.train.export_dir = _EXPORT.value
    autoencoder.train(config, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
