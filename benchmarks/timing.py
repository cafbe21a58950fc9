"""Clock, medians and machine facts, with the standard library only (every environment imports this).

Runners print one line ``BENCH_RESULT {json}`` as their last word; ``run.py`` reads it.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

RESULT_PREFIX = "BENCH_RESULT "
clock = time.perf_counter  # module-level so tests can substitute a fake clock


def measure(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Median wall seconds of ``sync(fn())`` over ``repeats`` calls after ``warmup`` calls.

    ``sync`` waits for the device (``jax.block_until_ready``, a host copy, ...) so the clock
    is read only after the work is done. The first warm-up call is timed separately.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    warm = []
    for _ in range(warmup):
        t0 = clock()
        sync(fn())
        warm.append(clock() - t0)
    times = []
    for _ in range(repeats):
        t0 = clock()
        sync(fn())
        times.append(clock() - t0)
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=times,
                first_call_s=warm[0] if warm else None)


def first_call(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> float:
    """Seconds of one (cold) call, synchronised."""
    t0 = clock()
    sync(fn())
    return clock() - t0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, load average and GPUs (from nvidia-smi, when there is one)."""
    gpus = []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        pass
    return dict(cpu=_cpu_model(), cores=os.cpu_count(), ram_gib=_ram_gib(), load_avg=list(os.getloadavg()),
                gpus=gpus, python=platform.python_version(), platform=platform.platform())


def versions(*names: str) -> dict[str, str | None]:
    """Installed versions of ``names`` in this environment (None where absent)."""
    from importlib import metadata
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def emit(result: dict[str, Any]) -> None:
    """Print the runner's result as the last line of stdout."""
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse(stdout: str) -> dict[str, Any]:
    """The result a runner printed with ``emit``."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise ValueError("the runner printed no BENCH_RESULT line")
