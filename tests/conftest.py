"""Test set-up: 8 fake CPU devices so sharded code runs on a CPU mesh."""

import atexit
import os
import shutil
import tempfile

# The tests compile far more than they run, so every program they compile (and every command they
# start: tests/helpers.subprocess_env passes these on) is compiled the cheapest way XLA's CPU
# backend offers: backend optimisation off (as train.fast_compile does for the train step), the
# classic LLVM emitters instead of the MLIR fusion emitters, and one LLVM module per program
# instead of parts compiled in parallel (on a busy 2-core host the parts only add overhead).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                           " --xla_cpu_parallel_codegen_split_count=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the session and the subprocesses its tests start: a program
# that several tests compile alike (the tiny train step, sampler, pipeline) is compiled once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdjax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from sdjax.cli import COMMAND_GC_THRESHOLD  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# The test processes trace as much as any command does: the commands' garbage-collector thresholds.
gc.set_threshold(*COMMAND_GC_THRESHOLD)

# The files that take minutes, longest first (measured on a 2-core host): ``./run test`` hands out
# whole files to its two workers in collection order (--dist loadfile --no-loadscope-reorder), so
# these start first and the quick files fill in behind them; both workers then finish together.
LONG_FILES = ("test_train_latent.py", "test_sdxl.py", "test_preemption.py", "test_evaluator.py", "test_lora.py",
              "test_configs.py", "test_aot.py", "test_demo.py", "test_install.py", "test_own_data.py", "test_fid.py",
              "test_stable_diffusion.py", "test_cli_train.py", "test_inpaint.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
    """A data_dir holding the tiny config's captioned-shapes set (``helpers.latent_config``: 64
    examples), prepared once per test process."""
    from sdjax.data import DataConfig, prepare
    from tests.helpers import latent_config

    d = str(tmp_path_factory.mktemp("shapes-data"))
    prepare(DataConfig.from_config(latent_config(d).data, batch_size=8))
    return d


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A Cloud Storage emulator for this test process, with ``STORAGE_EMULATOR_HOST`` set in it (so
    sdjax's gs:// paths and the commands tests start reach it); ``gcs.bucket(name)`` makes a bucket."""
    from tests.helpers import GcsEmulator

    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    yield emulator
    emulator.stop()
    if previous is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous
