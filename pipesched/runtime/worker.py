"""One thread per rank, bound to its device and compute stream, reused across steps.

Why threads: CUDA kernel launches and CPU torch kernels release the GIL, so
ranks overlap on devices (and on CPU cores) while one Python process keeps
every tensor addressable. Why one *fixed* thread per rank: CUDA's current
device and stream are thread-local, and a rank's actions must run strictly in
plan order, one at a time.

Workers take whole jobs (a rank's action list for one step), not single tasks,
so the event loop is not on the path between two consecutive actions.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from pipesched.runtime.stream import new_stream, use_device

_STOP = object()
_thread_role = threading.local()


def on_worker_thread() -> bool:
    """True on a pipeline's worker thread: code there runs as part of a pipelined step.

    Modules that behave differently inside a pipeline ask this (a deferred
    batch norm leaves its update to the step there, and applies it itself
    every ``chunks`` calls elsewhere).
    """
    return getattr(_thread_role, "worker", False)


class Worker:
    """A daemon thread running submitted jobs in order on ``device`` / ``stream``."""

    def __init__(self, rank: int, device: torch.device, name: str | None = None):
        self.rank = rank
        self.device = device
        self.stream = new_stream(device)
        self._jobs: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._serve, name=name or f"pipesched-rank{rank}", daemon=True
        )
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; it must catch its own exceptions (see the orchestrator)."""
        if not self._thread.is_alive():
            raise RuntimeError(f"worker of rank {self.rank} is closed")
        self._jobs.put(job)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued jobs, then stop the thread."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        _thread_role.worker = True
        with use_device(self.device, self.stream):
            while True:
                job = self._jobs.get()
                if job is _STOP:
                    return
                job()  # type: ignore[operator]
                job = None  # not kept while waiting: a failed step's errors hold their frames' graphs
