"""The README's shell commands, for the tests that run them as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
# Flags a test appends to the README's training commands: a few steps, small batches, quick compiles.
SHORT = {"autoencoder": ["--config.train.steps={steps}", "--config.train.batch_size=4", "--config.train.eval_every=2",
                         "--config.train.checkpoint_every=2", "--config.train.log_every=1",
                         "--config.train.fast_compile=True", "--config.train.eval_images=4"],
         "latent": ["--config.train.steps={steps}", "--config.train.batch_size=4", "--config.train.checkpoint_every=2",
                    "--config.train.sample_every=2", "--config.train.log_every=1", "--config.train.fast_compile=True"]}


def readme_block(heading: str) -> list[str]:
    """The first bash block after ``heading``, one command per entry (backslash continuations joined)."""
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(heading):], re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
