"""Run at start-up by every command the tests start (tests/helpers.subprocess_env puts this folder on
PYTHONPATH): on a multi-process CPU run, JAX keys its persistent compilation cache by a topology
fingerprint that differs between the processes, and only process 0 writes the cache, so every
process but the first compiled every program again at every launch of a multi-process test. On CPU
the key here hashes the devices' kind instead (JAX's own fallback where no topology is available),
as it already does on TPU where all hosts share a slice's fingerprint: process 1 then loads what
process 0 compiled, as ``jax_share_binary_between_hosts`` does. Nothing else changes: the program,
its compile options (the global device assignment included) and the other parts of the key stay
in it."""

import importlib.abc
import sys


def _same_key_on_every_process(cache_key) -> None:
    by_topology = cache_key._hash_accelerator_config

    def hash_accelerator_config(hash_obj, accelerators):
        if accelerators.flat[0].platform == "cpu":
            cache_key._hash_devices(hash_obj, accelerators)
        else:
            by_topology(hash_obj, accelerators)

    cache_key._hash_accelerator_config = hash_accelerator_config


class _OnImport(importlib.abc.MetaPathFinder):
    """Patches ``jax._src.cache_key`` once it is imported (importing JAX here would fix its
    configuration before the command sets its own)."""

    def find_spec(self, name, path, target=None):
        if name != "jax._src.cache_key":
            return None
        sys.meta_path.remove(self)
        spec = next(s for f in sys.meta_path if (s := getattr(f, "find_spec", lambda *a: None)(name, path, target)))
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _same_key_on_every_process(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _OnImport())
