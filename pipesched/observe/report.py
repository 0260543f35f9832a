"""What one step or forward reports: its tasks on one clock, and measured memory per rank."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipesched.plan.record import TaskRecord


@dataclass(frozen=True, slots=True)
class CommRecord:
    """One transfer as seen by this rank: ``kind`` is ``"send"`` or ``"recv"``."""

    rank: int
    peer: int
    kind: str
    action: str
    start: float
    end: float
    nbytes: int

    def as_dict(self) -> dict[str, object]:
        return {"rank": self.rank, "peer": self.peer, "kind": self.kind, "action": self.action,
                "start": self.start, "end": self.end, "bytes": self.nbytes}


@dataclass(frozen=True)
class StepReport:
    """``pipe.last_report`` after every ``step()`` and ``pipe(inputs)``.

    * ``tasks``: every executed action, ordered by start time.
    * ``peak_inflight[r]``: most micro-batches rank ``r`` had forwarded and not
      yet backwarded at once (summed over the rank's stages).
    * ``peak_activation_bytes[r]``: most bytes rank ``r`` held at once for
      backward (see :mod:`pipesched.runtime.checkpoint` for what counts).
    * ``held_activation_bytes[r]``: bytes rank ``r`` still held when the call
      returned: 0 after ``step()``; after ``pipe(x)`` with grad enabled, what
      waits for ``output.backward()``.
    * ``plan``: which plan of the schedule ran (``Schedule.describe_plan``): the
      schedule's name, or for ``"auto"`` whether it was the warm-up or the plan
      synthesised from measured costs.
    """

    schedule: str
    num_stages: int
    num_ranks: int
    num_microbatches: int
    placement: list[int]
    tasks: list[TaskRecord] = field(default_factory=list)
    peak_inflight: list[int] = field(default_factory=list)
    peak_activation_bytes: list[int] = field(default_factory=list)
    held_activation_bytes: list[int] = field(default_factory=list)
    plan: str = ""

    @property
    def makespan(self) -> float:
        """Seconds from the first task's start to the last task's end."""
        if not self.tasks:
            return 0.0
        return max(t.end for t in self.tasks) - min(t.start for t in self.tasks)

    def busy(self, rank: int) -> float:
        """Seconds rank ``rank`` spent computing."""
        return sum(t.duration for t in self.tasks if t.rank == rank)
