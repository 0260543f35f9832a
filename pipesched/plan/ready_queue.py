"""What one rank may run next in a list schedule, kept in heaps instead of rescanned at every decision.

:func:`pipesched.plan.greedy.list_schedule` plays a step out in time; each
time a rank is free it picks, among the actions whose inputs have all been
scheduled, the best forward, backward or weight-gradient pass by a fixed
priority. Rescanning every released action at each decision costs the
number of released actions per decision, which at 32 ranks and 256
micro-batches (a first rank holds all of its forwards from the start) is
most of a synthesis. Here each released action waits in a heap until its
inputs arrive, then sits in the heap of its kind (forwards: one heap per
stage, since the memory limit admits or blocks a whole stage at once), so a
decision costs a logarithm.

The picks are those of a scan in release order: ties of a priority go to
the action released first (each entry carries its release number), as
``min`` over a dict in insertion order would choose.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from typing import Any

from pipesched.plan.action import Action

__all__ = ["ReadyQueue"]


class ReadyQueue:
    """The released actions of one rank: not yet arrived, or ready by kind (and forwards by stage)."""

    def __init__(self, stages: Iterable[int], forward_key: Callable[[Action], Any]):
        self._forward_key = forward_key
        self._waiting: list[tuple[float, int, Action]] = []  # F and B whose inputs are still on their way
        self._waiting_w: list[tuple[float, int, Action]] = []  # W likewise (they never count as upcoming)
        self._forwards: dict[int, list[tuple[Any, int, Action]]] = {stage: [] for stage in stages}
        self._backwards: list[tuple[tuple[int, int], int, Action]] = []
        self._weights: list[tuple[tuple[float, int, int], int, Action]] = []

    def release(self, action: Action, arrival: float, number: int) -> None:
        """``action``'s inputs arrive at ``arrival``; ``number`` orders releases (ties go to the lower)."""
        heapq.heappush(self._waiting_w if action.kind == "W" else self._waiting, (arrival, number, action))

    def advance(self, now: float) -> None:
        """Move every action whose inputs have arrived by ``now`` to the heap of its kind."""
        for heap in (self._waiting, self._waiting_w):
            while heap and heap[0][0] <= now:
                arrival, number, action = heapq.heappop(heap)
                if action.kind == "F":
                    heapq.heappush(self._forwards[action.stage], (self._forward_key(action), number, action))
                elif action.kind == "B":
                    heapq.heappush(self._backwards, ((action.microbatch, -action.stage), number, action))
                else:
                    heapq.heappush(self._weights, ((arrival, action.microbatch, -action.stage), number, action))

    def upcoming(self) -> float:
        """When the next forward or backward not yet arrived arrives (``inf``: none)."""
        return self._waiting[0][0] if self._waiting else math.inf

    def backward(self) -> Action | None:
        """The ready backward of the earliest micro-batch, then the latest stage."""
        return self._backwards[0][2] if self._backwards else None

    def weight(self) -> Action | None:
        """The ready weight-gradient pass that arrived first (then the earliest micro-batch, latest stage)."""
        return self._weights[0][2] if self._weights else None

    def forward(self, admitted: Callable[[int], bool]) -> tuple[Action | None, bool]:
        """The best ready forward of a stage ``admitted`` lets in, and whether one it keeps out is ready."""
        best: tuple[Any, int, Action] | None = None
        blocked = False
        for stage, heap in self._forwards.items():
            if not heap:
                continue
            if not admitted(stage):
                blocked = True
            elif best is None or heap[0][:2] < best[:2]:
                best = heap[0]
        return (best[2] if best is not None else None), blocked

    def take(self, action: Action) -> None:
        """Remove ``action``, the top of its kind's heap (what :meth:`forward`, :meth:`backward` or :meth:`weight` gave)."""
        if action.kind == "F":
            heap: list[Any] = self._forwards[action.stage]
        else:
            heap = self._backwards if action.kind == "B" else self._weights
        if not heap or heap[0][2] is not action:
            raise ValueError(f"{action} is not the next {action.kind} of its rank")
        heapq.heappop(heap)
