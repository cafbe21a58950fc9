"""What the two AOT runners share: the TPU slice named on the command line, and the compiler's
per-chip figures of a compiled program. Standard library + jax only (the peer's environment runs it)."""

import argparse
import re
import time


def add_args(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--topology", required=True, help=f"jax topology name, e.g. {example}")
    p.add_argument("--chip-config", required=True)
    p.add_argument("--bounds", required=True, help="chips per host, e.g. 2,2,1")
    p.add_argument("--wrap", default="0,0,0")
    p.add_argument("--per-chip-batch", type=int, default=8)


def devices(a: argparse.Namespace) -> list:
    """The slice's devices, described by libtpu (no TPU needed)."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(
        platform="tpu", topology_name=a.topology, chip_config_name=a.chip_config,
        chips_per_host_bounds=tuple(int(b) for b in a.bounds.split(",")),
        num_slices=1, wrap=tuple(bool(int(w)) for w in a.wrap.split(","))).devices


def compile_figures(lowered) -> tuple[dict, str]:
    """(compile time, FLOPs, bytes, the compiler's roofline time, memory, custom calls; the HLO text)."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    figures, hlo = figures_of(compiled)
    return dict(compile_s=compile_s, **figures), hlo


def figures_of(compiled) -> tuple[dict, str]:
    """A compiled program's FLOPs, bytes, the compiler's roofline time, memory, custom calls; its HLO text."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    return dict(flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"),
                optimal_seconds=cost.get("optimal_seconds"), argument_bytes=mem.argument_size_in_bytes,
                temp_bytes=mem.temp_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                alias_bytes=mem.alias_size_in_bytes,
                custom_calls=sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))), hlo
