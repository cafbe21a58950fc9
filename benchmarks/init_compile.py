"""A fresh network's init program: its compile with each parameter drawn on its own (``module.init``)
against the grouped draws the trainers use (``sdjax.models.param_init.init_params``).

    python -m benchmarks.init_compile [--config tiny] [--preset sd15] [--topology host|v5e-8] [--out init-compile.json]

For each network of ``--config`` (with ``--preset``: that architecture), the init is jitted as the
trainers jit it (XLA's backend optimisation off: it runs once) and compiled for one device of
``--topology`` (``host``: this machine's first; a TPU name: libtpu's compiler, no TPU needed), each
variant in a fresh process so neither finds the other's work cached. Prints a table (CPU seconds of
the compile, measured; the HLO's instruction count) and writes JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import timing

VARIANTS = ("module.init", "init_params")


def _one(config_name: str, preset: str | None, topology: str, network: str, variant: str) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from sdjax import aot, configs, sources
    from sdjax.models.configs import build_modules, init_inputs
    from sdjax.models.param_init import init_params
    from sdjax.train_state import RUN_ONCE_COMPILER_OPTIONS
    from sdjax.training.schema import LatentRunConfig

    source = LatentRunConfig.from_config(configs.load(config_name)).model
    model = sources.abstract(source, preset).configs
    module, inputs = build_modules(model)[network], init_inputs(model)[network]
    if variant == "module.init":
        init = lambda key: module.init(key, *inputs)["params"]  # noqa: E731
    else:
        init = lambda key: init_params(module, key, *inputs)  # noqa: E731
    device = aot.topology_devices(topology)[0][0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    jitted = jax.jit(lambda seed: nn.meta.unbox(init(jax.random.key(seed))), out_shardings=sharding,
                     compiler_options=RUN_ONCE_COMPILER_OPTIONS)
    lowered = jitted.lower(jax.ShapeDtypeStruct((), jnp.uint32, sharding=sharding))
    c0, t0 = time.process_time(), time.perf_counter()
    compiled = lowered.compile()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    hlo = compiled.as_text() or ""
    params = jax.eval_shape(init, jax.random.key(0))
    return {"network": network, "variant": variant, "compile_cpu_s": cpu, "compile_s": wall,
            "hlo_instructions": sum(1 for line in hlo.splitlines() if " = " in line),
            "arrays": len(jax.tree.leaves(params)), "device": str(device.device_kind)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--preset", default=None, help="an architecture (sd15, sd21, ...) instead of the config's")
    p.add_argument("--topology", default="host")
    p.add_argument("--networks", default="unet,text_encoder,vae")
    p.add_argument("--out", default="init-compile.json")
    p.add_argument("--one", nargs=2, metavar=("NETWORK", "VARIANT"), help=argparse.SUPPRESS)  # in this process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(_one(a.config, a.preset, a.topology, *a.one)))
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # a TPU slice is described by libtpu, not opened
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    rows = []
    for network in a.networks.split(","):
        for variant in VARIANTS:
            print(f"{network}, {variant}: compiling in a new process ...", flush=True)
            cmd = [sys.executable, "-m", "benchmarks.init_compile", "--config", a.config, "--topology", a.topology,
                   "--one", network, variant] + (["--preset", a.preset] if a.preset else [])
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    what = a.preset or a.config
    print(f"\n{what}'s init programs compiled for {a.topology} ({rows[0]['device']}), on {timing.machine()['cpu']} "
          "(measured)\n")
    print("| network | arrays | module.init: compile CPU s / HLO instructions | init_params: compile CPU s / HLO "
          "instructions | ratio |")
    print("|---|---|---|---|---|")
    for plain, grouped in zip(rows[::2], rows[1::2]):
        print(f"| {plain['network']} | {plain['arrays']} | "
              f"{plain['compile_cpu_s']:.2f} / {plain['hlo_instructions']} | "
              f"{grouped['compile_cpu_s']:.2f} / {grouped['hlo_instructions']} | "
              f"{plain['compile_cpu_s'] / grouped['compile_cpu_s']:.1f}x |")
    with open(a.out, "w") as f:
        json.dump({"config": a.config, "preset": a.preset, "topology": a.topology, "rows": rows,
                   "machine": timing.machine(), "versions": timing.versions("jax", "jaxlib", "flax", "libtpu")},
                  f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
