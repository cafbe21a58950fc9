"""One process of a multi-process latent-diffusion run on loopback CPUs (used by test_train_latent).

    SDJAX_COORDINATOR=localhost:PORT SDJAX_NUM_PROCESSES=2 SDJAX_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python tests/latent_multiprocess.py DATA_DIR WORKDIR OUT.npz STEPS

Each process feeds its own data shard. At the end both export (latent.export) to WORKDIR/export
and process 0 writes the final params and EMA params to OUT.npz ("params/..." and "ema_params/...").
"""

import os
import sys

import numpy as np

from sdjax import sharding
from sdjax.data import DataConfig, make_dataset


def tiny_test_config(data_dir: str):
    """The tiny config shrunk for tests: 64 examples, global batch 8 on a 2 x 4 mesh, quick compiles."""
    from sdjax import configs

    c = configs.load("tiny")
    c.data.data_dir, c.data.num_examples = data_dir, 64
    c.mesh.shape = (2, 4)
    c.train.update(batch_size=8, caption_dropout=0.5, fast_compile=True, sample_every=0, log_every=1,
                   warmup_steps=0, schedule="constant")
    return c


def emulated_host_batches(setup, num_hosts: int):
    """In one process, the global batches ``num_hosts`` hosts would feed (their rows in process order)."""
    from sdjax.tokenizer import tokenize
    base = setup.data
    seq_len = setup.configs.text_encoder.max_position_embeddings
    tok = lambda text: tokenize(setup.tokenizer, [text], seq_len)[0]  # noqa: E731
    its = [make_dataset(DataConfig(**{**base.__dict__, "batch_size": base.batch_size // num_hosts,
                                      "shard_index": i, "shard_count": num_hosts}), tokenize=tok)
           for i in range(num_hosts)]
    while True:
        parts = [next(it) for it in its]
        yield {k: np.concatenate([p[k] for p in parts]) for k in ("image", "input_ids")}


def run(setup, host_batches, steps: int):
    """Initialises on the first batch and takes ``steps`` steps; returns the final state."""
    from sdjax.training import latent

    batch = latent.device_batch(setup, next(host_batches))
    state = latent.init_state(setup, batch)
    for i in range(steps):
        if i:
            batch = latent.device_batch(setup, next(host_batches))
        state, _ = setup.step_fn(state, batch, setup.frozen)
    return state


def main(data_dir: str, workdir: str, out: str, steps: int) -> None:
    sharding.initialize_distributed()
    import jax
    from flax import traverse_util
    from jax.experimental import multihost_utils

    from sdjax.training import latent

    setup = latent.build(tiny_test_config(data_dir), workdir)
    state = run(setup, iter(latent.make_iterator(setup)), steps)
    latent.export(setup, state, os.path.join(workdir, "export"))
    trees = multihost_utils.process_allgather({"params": state.params, "ema_params": state.ema_params}, tiled=True)
    if jax.process_index() == 0:
        flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, trees), sep="/")
        np.savez(out, **flat)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
