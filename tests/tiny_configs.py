"""The shipped tiny configs shrunk for tests: few examples, small batches, quick compiles."""

from sdjax import configs


def latent_config(data_dir: str):
    """configs/tiny.py: 64 examples, global batch 8 on a 2 x 4 mesh, XLA's backend optimisation off."""
    c = configs.load("tiny")
    c.data.data_dir, c.data.num_examples = data_dir, 64
    c.mesh.shape = (2, 4)
    c.train.update(batch_size=8, caption_dropout=0.5, fast_compile=True, sample_every=0, log_every=1,
                   warmup_steps=0, schedule="constant")
    return c
