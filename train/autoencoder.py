"""Phase 1: train the perceptual KL autoencoder (L1 + LPIPS + KL + PatchGAN), then export it.

    python train/autoencoder.py --config tiny_autoencoder --workdir /tmp/sdjax_vae [--export DIR]

The same as ``sdjax-train autoencoder ...`` (``sdjax/cli/train.py``). Re-running with the same
--workdir resumes from its latest checkpoint. The export is what ``train/latent.py`` takes as
``--config.autoencoder.path``.
"""

from sdjax.cli.train import main

if __name__ == "__main__":
    main(phase="autoencoder")
