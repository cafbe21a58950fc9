"""Preemption: SIGTERM (what a TPU VM receives before it is taken away) ends training at a step
every host agrees on, after a checkpoint of that step.

On a multi-process run JAX's preemption service (started by ``jax.distributed.initialize``)
catches the signal on any host, tells the others and picks the sync step;
``multihost_utils.reached_preemption_sync_point`` is then true on every host at that step, so
it must be asked at every step. On one process without ``jax.distributed`` a signal handler
sets a flag read at the next step.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
    """Training stopped at ``step`` for a preemption, after saving that step."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}: saved")
        self.step = step


class Watch:
    """``reached(step)``: whether to save ``step`` and stop. Use as a context manager (it restores
    the previous SIGTERM handler on exit)."""

    def __init__(self):
        self._service = jax.distributed.is_initialized()
        self._signalled = False
        self._previous = None

    def __enter__(self) -> "Watch":
        # Python takes signal handlers in the main thread only; training started from another thread
        # (a notebook's worker, say) then stops at SIGTERM as the process's own handler says.
        if not self._service and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def _on_signal(self, signum, frame):
        self._signalled = True
        if jax.process_index() == 0:
            print("SIGTERM received: saving at the end of this step", flush=True)

    def reached(self, step: int) -> bool:
        if self._service:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled
