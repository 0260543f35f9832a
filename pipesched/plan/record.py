"""One action that ran, or that the simulator placed in time: rank, stage, micro-batch, kind, start, end.

The shared vocabulary of what ran: the runtime records measured tasks with it,
the simulator returns simulated ones and reads measured ones as costs, and the
step reports and timelines (:mod:`pipesched.observe`) are made of them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One executed action. ``start``/``end`` are ``time.perf_counter()`` seconds.

    ``start`` is taken once the action's inputs are available, so the gap
    before it is the rank's idle (bubble) time.
    """

    rank: int
    stage: int
    microbatch: int
    kind: str
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    def as_dict(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "stage": self.stage,
            "microbatch": self.microbatch,
            "kind": self.kind,
            "start": self.start,
            "end": self.end,
        }
