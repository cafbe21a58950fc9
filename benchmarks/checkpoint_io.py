"""Saving and restoring a train state on a CPU mesh: sdjax's checkpoint handler against Orbax's default.

    python -m benchmarks.checkpoint_io [--config tiny] [--devices 8] [--saves 3] [--out checkpoint-io.json]

The state is a run's (``--config``'s UNet and text encoder trained: params, EMA, Adam's two
moments) replicated over ``--devices`` CPU devices, as data parallelism holds it. Each variant runs
in a fresh process (the first save of a process also compiles what it dispatches): ``--saves``
saves, each timed until it is written, then a restore. ``sdjax``: ``checkpoints.train`` as is;
``orbax-default``: the same with Orbax's default replica-parallel writing for every array (each
replica writes a slice of each array). Prints a table (CPU seconds of the whole process and wall
seconds) and writes JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import timing

VARIANTS = ("sdjax", "orbax-default")


def _one(config_name: str, variant: str, saves: int) -> dict:
    import jax
    import numpy as np

    from sdjax import configs, sources
    from sdjax.checkpoints import train as train_ckpt
    from sdjax.training import latent
    from sdjax.training.schema import LatentRunConfig

    if variant == "orbax-default":
        if not hasattr(train_ckpt, "_MIN_REPLICA_SLICE_BYTES"):  # else both rows would measure sdjax's handler
            raise SystemExit("sdjax.checkpoints.train._MIN_REPLICA_SLICE_BYTES is gone: update this benchmark")
        train_ckpt._MIN_REPLICA_SLICE_BYTES = None
    c = configs.load(config_name)
    c.mesh.shape = (-1, 1)  # data parallel: every array replicated on every device
    c.train.batch_size = len(jax.devices())
    run_config = LatentRunConfig.from_config(c)
    with tempfile.TemporaryDirectory() as workdir:  # the run's own state target, from its abstract networks
        run = latent.build(run_config, workdir, sources=sources.abstract(run_config.model))
    target = run.program.restore_target()
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jax.device_put(rng.standard_normal(s.shape).astype(s.dtype), s.sharding), target)
    leaves = jax.tree.leaves(state)
    row = {"variant": variant, "arrays": len(leaves), "mb": sum(x.nbytes for x in leaves) / 1e6, "saves_s": [],
           "saves_cpu_s": []}

    def clocked(fn):  # (result, wall s, CPU s of the whole process: Orbax writes from its own threads)
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, time.process_time() - c0

    def save(manager, step):
        train_ckpt.save(manager, state.replace(step=step), force=True)
        manager.wait_until_finished()

    def restore(manager):
        return jax.block_until_ready(train_ckpt.restore_latest(manager, target))

    with tempfile.TemporaryDirectory(prefix="sdjax-ckpt-bench-") as workdir:
        manager = train_ckpt.make_manager(workdir)
        for i in range(saves):
            _, wall, cpu = clocked(lambda: save(manager, state.step + i))
            row["saves_s"].append(wall)
            row["saves_cpu_s"].append(cpu)
        manager.close()
        manager = train_ckpt.make_manager(workdir)
        restored, row["restore_s"], row["restore_cpu_s"] = clocked(lambda: restore(manager))
        manager.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state.replace(step=state.step + saves - 1))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--out", default="checkpoint-io.json")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    a = p.parse_args(argv)
    if a.variant:
        print(json.dumps(_one(a.config, a.variant, a.saves)))
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
        [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={a.devices}"]).strip())
    rows = []
    for variant in VARIANTS:
        print(f"{variant}: saving {a.saves} times and restoring, in a new process ...", flush=True)
        done = subprocess.run([sys.executable, "-m", "benchmarks.checkpoint_io", "--variant", variant, "--config",
                               a.config, "--saves", str(a.saves)], env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\n{a.config}'s train state, {rows[0]['arrays']} arrays, {rows[0]['mb']:.1f} MB, replicated over "
          f"{a.devices} CPU devices ({timing.machine()['cpu']}, measured)\n")
    print("| handler | first save (CPU s / wall s) | later saves (CPU s) | restore (CPU s / wall s) |")
    print("|---|---|---|---|")
    for r in rows:
        later = ", ".join(f"{x:.2f}" for x in r["saves_cpu_s"][1:])
        print(f"| {r['variant']} | {r['saves_cpu_s'][0]:.2f} / {r['saves_s'][0]:.2f} | {later} | "
              f"{r['restore_cpu_s']:.2f} / {r['restore_s']:.2f} |")
    with open(a.out, "w") as f:
        json.dump({"config": a.config, "devices": a.devices, "rows": rows, "machine": timing.machine(),
                   "versions": timing.versions("jax", "orbax-checkpoint", "tensorstore")}, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
