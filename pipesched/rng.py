"""Exact replay of random draws for recomputation, while other ranks keep drawing.

A checkpointed forward is run twice: once to produce its output, once (before
its backward) to rebuild the activations autograd needs. Dropout must draw the
same mask both times. On the CPU every rank draws from the one process-wide
generator, so "save the state before the forward, restore it before the
recompute" races: between the save and the first draw another rank may draw
and shift the stream.

The rule that makes replay exact:

* A stage whose forward draws random numbers runs that forward holding the
  generator's lock; the state it starts from is therefore exactly the state
  its draws consume.
* A recompute takes the same lock, forks the generator (save the live state,
  set the captured one, run, put the live state back), so the global stream
  continues as if the recompute never happened. With only one rank drawing,
  results are therefore identical under every checkpoint policy.
* A stage that draws nothing must not pay: the first forward of each stage
  (per training mode) is a probe run under the lock that compares generator
  states before and after. Stages found to draw nothing then run without the
  lock and without snapshots. A stage whose draws depend on its input (drew
  nothing in the probe, draws later) is outside this rule.

CUDA devices each have their own generator and lock; a stage on a CUDA device
snapshots both its device's generator and the CPU one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

_CPU_LOCK = threading.RLock()  # reentrant: a compiled stage re-takes it inside a drawing forward
_CUDA_LOCKS: dict[int, threading.RLock] = {}
_CUDA_LOCKS_GUARD = threading.Lock()


def _locks(device: torch.device) -> list[threading.RLock]:
    if device.type != "cuda":
        return [_CPU_LOCK]
    with _CUDA_LOCKS_GUARD:
        lock = _CUDA_LOCKS.setdefault(device.index, threading.RLock())
    return [_CPU_LOCK, lock]  # always CPU first: one global order, no lock-order deadlock


@contextlib.contextmanager
def _holding(device: torch.device) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for lock in _locks(device):
            stack.enter_context(lock)
        yield


@dataclass(frozen=True)
class RngSnapshot:
    """Generator states a forward started from: CPU, and the CUDA device's if any."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def take(cls, device: torch.device) -> RngSnapshot:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def same_as(self, other: RngSnapshot) -> bool:
        same_cuda = self.cuda is None or bool(torch.equal(self.cuda, other.cuda))  # type: ignore[arg-type]
        return bool(torch.equal(self.cpu, other.cpu)) and same_cuda


class RandomReplay:
    """Remembers which stages draw random numbers; runs first passes and replays."""

    def __init__(self) -> None:
        self._draws: dict[tuple[int, bool], bool] = {}

    def draws(self, stage: int, training: bool) -> bool | None:
        """``True``/``False`` once probed, ``None`` before the first forward."""
        return self._draws.get((stage, training))

    def first_run(
        self, stage: int, training: bool, device: torch.device, capture: bool, run: Callable[[], T]
    ) -> tuple[T, RngSnapshot | None]:
        """Run a forward the first time; return its result and, if needed, its snapshot.

        The snapshot is ``None`` when ``capture`` is false or the stage draws
        nothing (its recompute then needs no replay).
        """
        key = (stage, training)
        known = self._draws.get(key)
        if known is False:
            return run(), None
        with _holding(device):
            before = RngSnapshot.take(device)
            result = run()
            if known is None:
                known = self._draws[key] = not before.same_as(RngSnapshot.take(device))
        return result, (before if capture and known else None)

    @staticmethod
    def replay(snapshot: RngSnapshot | None, run: Callable[[], T]) -> T:
        """Re-run a forward with the draws of its first run, leaving the live stream as it was."""
        if snapshot is None:
            return run()
        with _holding(snapshot.device):
            live = RngSnapshot.take(snapshot.device)
            snapshot.restore()
            try:
                return run()
            finally:
                live.restore()


def generators_held(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Hold the locks of the generators a forward on ``device`` draws from (reentrant).

    For code that moves the process-wide generators without drawing: Dynamo
    saves and restores them around every compilation, which would rewind the
    draws of a forward running on another rank meanwhile (see
    :mod:`pipesched.compiling`).
    """
    return _holding(device)
