"""One intra-op thread per rank, and a probe that shows what each rank really used.

``torch.set_num_threads`` is process-global: with OpenMP, each thread reads
the global count the first time it runs a parallel op. So setting it *before*
building a pipeline (whose workers are new threads) gives every worker one
thread, like the single-thread baseline; :class:`ThreadProbe` records
``torch.get_num_threads()`` from inside forward on whichever thread runs it, so
the JSON shows it rather than assumes it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ThreadProbe:
    """Forward pre-hooks on ``modules`` that record ``{thread name: torch.get_num_threads()}``."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: object) -> None:
        name = threading.current_thread().name
        if name not in self.seen:
            count = torch.get_num_threads()
            with self._lock:
                self.seen[name] = count

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ThreadProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
