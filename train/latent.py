"""Phase 2: train a latent diffusion model (UNet on a frozen autoencoder's latents).

    python train/latent.py --config tiny --workdir /tmp/sdjax_tiny [--export DIR] [--config.train.steps=50]

The same as ``sdjax-train latent ...`` (``sdjax/cli/train.py``). Re-running with the same
--workdir resumes from its latest checkpoint. Multi-host: set SDJAX_COORDINATOR=host:port,
SDJAX_NUM_PROCESSES and SDJAX_PROCESS_ID (or SDJAX_DISTRIBUTED=auto).
"""

from sdjax.cli.train import main

if __name__ == "__main__":
    main(phase="latent")
