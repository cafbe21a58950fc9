"""Run at start-up by every command the tests start (tests/helpers.subprocess_env puts this folder on
PYTHONPATH), so that the processes of a multi-process command on CPU compile each program once
between them, as the hosts of a TPU slice can (``jax_share_binary_between_hosts``):

- JAX keys its persistent compilation cache by a topology fingerprint that differs between the
  processes of a CPU run, and only process 0 writes the cache, so every process but the first
  compiled every program again at every launch. On CPU the key here hashes the devices' kind
  instead (JAX's own fallback where no topology is available), as it already does on TPU where all
  hosts share a slice's fingerprint: process 1 then loads what process 0 compiled. The program, its
  compile options (the global device assignment included) and the other parts of the key stay in it.
- At a first launch both processes miss the cache at the same moment and both compiled. Here process
  0 marks each program it compiles (``<key>.compiling`` in the cache folder, holding its pid) until
  the cache entry is written, and a process > 0 that misses waits for such a mark (a few seconds, as
  the processes reach a program at slightly different times) and then for its removal, and reads
  the entry. Only programs that span the processes wait (each process compiles those alike); no mark
  (a program process 0 did not compile) or a dead process 0: the process compiles it itself.
"""

import importlib.abc
import os
import sys
import time

# How long a process > 0 waits for process 0 to start compiling a program it missed.
MARK_WAIT_SECONDS = 10.0


def _same_key_on_every_process(cache_key) -> None:
    by_topology = cache_key._hash_accelerator_config

    def hash_accelerator_config(hash_obj, accelerators):
        if accelerators.flat[0].platform == "cpu":
            cache_key._hash_devices(hash_obj, accelerators)
        else:
            by_topology(hash_obj, accelerators)

    cache_key._hash_accelerator_config = hash_accelerator_config


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _compile_once_between_processes(compiler) -> None:
    from jax._src import distributed, lru_cache

    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    read, compile_and_write = compiler._cache_read, compiler._compile_and_write_cache

    def mark_of(backend, devices, cache_key) -> str | None:
        """The mark's path for a program that spans processes (compiled alike by each), else None."""
        if folder and os.path.isdir(folder) and backend.platform == "cpu" and not devices.is_fully_addressable:
            return os.path.join(folder, f"{cache_key}.compiling")
        return None

    def compile_and_write_cache(backend, computation, devices, options, callbacks, module_name, cache_key):
        mark = mark_of(backend, devices, cache_key)
        if mark is None or distributed.global_state.process_id != 0:
            return compile_and_write(backend, computation, devices, options, callbacks, module_name, cache_key)
        with open(mark, "w") as f:
            f.write(str(os.getpid()))
        try:
            return compile_and_write(backend, computation, devices, options, callbacks, module_name, cache_key)
        finally:
            os.remove(mark)

    def cache_read(module_name, cache_key, options, backend, devices):
        found = read(module_name, cache_key, options, backend, devices)
        mark = mark_of(backend, devices, cache_key)
        if found[0] is not None or mark is None or distributed.global_state.process_id == 0:
            return found
        # The entry, if process 0 compiles the program between two looks (then its mark came and went:
        # it is removed once the entry is written, and made before).
        entry = os.path.join(folder, f"{cache_key}{lru_cache._CACHE_SUFFIX}")
        deadline = time.monotonic() + MARK_WAIT_SECONDS
        while not (os.path.exists(mark) or os.path.exists(entry)) and time.monotonic() < deadline:
            time.sleep(0.02)
        while os.path.exists(mark):
            try:
                with open(mark) as f:
                    pid = f.read()
            except FileNotFoundError:
                break
            if pid and not _alive(int(pid)):
                break  # process 0 died while compiling: compile here
            time.sleep(0.02)
        return read(module_name, cache_key, options, backend, devices)

    compiler._cache_read, compiler._compile_and_write_cache = cache_read, compile_and_write_cache


class _OnImport(importlib.abc.MetaPathFinder):
    """Patches JAX's modules once they are imported (importing JAX here would fix its configuration
    before the command sets its own)."""

    patches = {"jax._src.cache_key": _same_key_on_every_process, "jax._src.compiler": _compile_once_between_processes}

    def find_spec(self, name, path, target=None):
        patch = self.patches.pop(name, None)
        if patch is None:
            return None
        if not self.patches:
            sys.meta_path.remove(self)
        spec = next(s for f in sys.meta_path
                    if f is not self and (s := getattr(f, "find_spec", lambda *a: None)(name, path, target)))
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _OnImport())
