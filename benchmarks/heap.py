"""Real bytes, independent of pipesched's meter: the C heap in use, read from glibc.

torch's CPU allocator takes tensor memory straight from ``malloc`` (no cache
on CPU), so the heap in use is what the process really holds. glibc's
``mallinfo2()`` sums every arena (worker threads get arenas of their own):
``uordblks`` is what is allocated from arenas, ``hblkhd`` what is allocated by
``mmap`` (large blocks); their sum is the heap in use.

A peak needs samples at the right moments. :class:`HeapPeak` takes them at
points a model itself marks (a probe layer after every stage's forward, and a
gradient hook as its backward starts, see :func:`probe`) and from a
background thread sampling every ``interval`` seconds; the peak is the
largest sample above the level before the step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

import torch
from torch import nn


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


_LIBC = _libc()


def available() -> bool:
    """Whether this C library reports its heap (glibc >= 2.33)."""
    return _LIBC is not None


def heap_in_use() -> int:
    """Bytes the process holds in malloc'ed memory right now (all arenas, plus mmapped blocks)."""
    info = _LIBC.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class HeapPeak:
    """The peak of :func:`heap_in_use` above its level at ``start()``, from marked points and a sampler."""

    def __init__(self, interval: float = 0.0002):
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        value = heap_in_use()
        with self._lock:
            self.peak = max(self.peak, value)

    def __enter__(self) -> HeapPeak:
        self.base = heap_in_use()
        self.peak = self.base
        self._stop.clear()
        self._thread = threading.Thread(target=self._sampler, name="heap-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def above_base(self) -> int:
        """Peak bytes above the level when the block began."""
        return self.peak - self.base

    def _sampler(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


class HeapProbe(nn.Module):
    """Identity layer that samples the heap after the forward before it, and when its gradient arrives."""

    def __init__(self, meter: HeapPeak):
        super().__init__()
        self.meter = meter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.meter.sample()
        if x.requires_grad:
            x.register_hook(self._on_gradient)
        return x

    def _on_gradient(self, grad: torch.Tensor) -> None:
        self.meter.sample()


def probe(layers: list[nn.Module], meter: HeapPeak) -> list[nn.Module]:
    """``layers`` with a :class:`HeapProbe` after each one."""
    out: list[nn.Module] = []
    for layer in layers:
        out += [layer, HeapProbe(meter)]
    return out
