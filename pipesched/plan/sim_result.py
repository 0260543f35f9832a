"""What a simulation found: :class:`SimResult`, shared by the reference simulator and the array-based one.

Its own module so that :mod:`pipesched.plan.simulate` (which hands the work to
:mod:`pipesched.plan.fast_simulate`) and the fast path both import it without
importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from pipesched.plan.action import Action
from pipesched.plan.record import TaskRecord

__all__ = ["SimResult", "ratio"]


@dataclass(frozen=True, eq=False)
class SimResult:
    """The outcome of :func:`simulate`. Times are seconds from the plan's start.

    Per-rank lists are indexed by rank. ``idle[r] = makespan - busy[r]``.

    * ``bubble_over_total[r] = idle[r] / makespan``; ``overall_bubble_over_total``
      is ``sum(idle) / (ranks * makespan)``: the share of all device-seconds spent waiting.
    * ``bubble_over_ideal[r] = idle[r] / busy[r]`` (``inf`` for a rank with no work
      in a plan that takes time); ``overall_bubble_over_ideal`` is
      ``sum(idle) / sum(busy)``, ``(p - 1) / m`` for GPipe with uniform costs.
    * ``peak_inflight[r]``: the most micro-batches rank ``r`` had forwarded and not
      yet backwarded at once, counting each of its stages (a micro-batch in
      flight on two stages of the rank counts twice, as it holds two sets of
      activations). A split backward holds its micro-batch until its W.
    * ``critical_path``: the chain of actions, first to last, each of which could
      not start earlier because of the one before it; its costs (plus ``comm`` on
      every rank change) add up to the makespan. It ends at the first action, in
      plan order (rank 0's list first), of those that end last.
    * ``start``, ``end``, ``rank_of``: read-only mappings keyed by action (in plan
      order; equal to dicts with the same items), looked up on demand, since a
      plan can hold millions of actions.
    """

    makespan: float
    busy: list[float]
    idle: list[float]
    bubble_over_total: list[float]
    bubble_over_ideal: list[float]
    overall_bubble_over_total: float
    overall_bubble_over_ideal: float
    peak_inflight: list[int]
    critical_path: list[Action]
    start: Mapping[Action, float]
    end: Mapping[Action, float]
    rank_of: Mapping[Action, int]
    num_stages: int

    @property
    def num_ranks(self) -> int:
        return len(self.busy)

    @classmethod
    def summarise(
        cls, makespan: float, busy: list[float], peak_inflight: list[int], critical_path: list[Action],
        start: Mapping[Action, float], end: Mapping[Action, float], rank_of: Mapping[Action, int], num_stages: int,
    ) -> SimResult:
        """The result of a run that took ``makespan`` with ``busy`` seconds per rank: idle time and bubbles derived."""
        idle = [max(0.0, makespan - b) for b in busy]
        total_busy, total_idle = math.fsum(busy), math.fsum(idle)
        return cls(
            makespan=makespan,
            busy=busy,
            idle=idle,
            bubble_over_total=[ratio(i, makespan) for i in idle],
            bubble_over_ideal=[ratio(i, b) for i, b in zip(idle, busy)],
            overall_bubble_over_total=ratio(total_idle, makespan * len(busy)),
            overall_bubble_over_ideal=ratio(total_idle, total_busy),
            peak_inflight=peak_inflight,
            critical_path=critical_path,
            start=start,
            end=end,
            rank_of=rank_of,
            num_stages=num_stages,
        )

    def records(self) -> list[TaskRecord]:
        """The simulated run as task records, ordered by start time.

        ``Timeline(sim.records())`` draws or exports the ideal run exactly like
        a measured one.
        """
        rows = [
            TaskRecord(self.rank_of[a], a.stage, a.microbatch, a.kind, self.start[a], self.end[a])
            for a in self.start
        ]
        return sorted(rows, key=lambda r: (r.start, r.rank))


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; 0 over 0 is 0, anything else over 0 is ``inf``."""
    if denominator > 0.0:
        return numerator / denominator
    return 0.0 if numerator <= 0.0 else math.inf
