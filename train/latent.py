"""Phase 2: train a latent diffusion model (UNet on a frozen autoencoder's latents).

    python train/latent.py --config configs/tiny.py --workdir /tmp/sdjax_tiny [--export DIR] [--config.train.steps=50]

Re-running with the same --workdir resumes from its latest checkpoint. Multi-host: set
SDJAX_COORDINATOR=host:port, SDJAX_NUM_PROCESSES and SDJAX_PROCESS_ID (or SDJAX_DISTRIBUTED=auto).
"""

from absl import app, flags
from ml_collections import config_flags

from sdjax import sharding
from sdjax.training import latent

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_EXPORT = flags.DEFINE_string("export", None, "Write an inference checkpoint (StableDiffusion.from_pretrained) here.")


def main(argv) -> None:
    del argv
    sharding.initialize_distributed()
    config = _CONFIG.value
    if _EXPORT.value:
        config.train.export_dir = _EXPORT.value
    latent.train(config, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
