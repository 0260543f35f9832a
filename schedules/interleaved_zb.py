"""Interleaved zero bubble: interleaved 1F1B's looped placement with split backwards (ZB paper's ZB-1P, looped).

Stage ``s`` lives on rank ``s % p``, ``v`` = ``virtual_stages`` stages per rank
(v >= 2). Micro-batches go in groups of at least ``p`` (sizes differing by at
most one, so any ``m`` works); a rank runs a group through its first stage,
then its second, and so on, backwards in reverse stage order, as interleaved
1F1B does. Two changes make the zero-bubble version:

* rank ``r`` warms up with ``(v - 1)·g + (p - 1 - r)`` forwards (``g`` the
  first group's size), one per hop instead of interleaved 1F1B's two: the B
  that comes back is only the input-gradient half, so it returns sooner;
* each backward is split and rank ``r`` runs each W ``r`` backwards late, into
  the moments it would wait (as ZB-H1 does with one stage per rank).

With ``f = b = w`` a stage's costs and ``m`` a multiple of ``p``, the makespan
is ``v·m(f + b + w) + (p - 1)(f + b - w)``: ZB-H1's bubble, ``v`` times
smaller against the work. A rank holds at most ``(v - 1)·g + p`` (stage,
micro-batch) pairs (``v·p`` when ``m`` is a multiple of ``p``), each ``1/v``
of a 1F1B stage.

``costs`` and ``comm`` (as :func:`pipesched.plan.simulate.simulate` takes them)
tune the order: when the drawn one is off the best any order could do, orders
built by simulation within the same per-rank memory are tried too and the
fastest is kept (:func:`pipesched.plan.greedy.tune_order`); among orders of
the same makespan, the one least sensitive to task-time jitter
(:func:`pipesched.plan.robust.jitter_makespan`), since this order leaves no
slack for a late task to hide in.
"""

from __future__ import annotations

from pipesched.plan.costs import Costs
from pipesched.plan.greedy import check_tuning, tune_order
from pipesched.plan.schedule import (
    Action,
    LoopedSchedule,
    Plan,
    defer_weight_passes,
    microbatch_groups,
    one_forward_one_backward,
)


class InterleavedZB(LoopedSchedule):
    one_stage_per_rank = "zb-h1"
    name = "interleaved-zb"

    def __init__(self, virtual_stages: int = 2, costs: Costs | None = None, comm: float = 0.0):
        super().__init__(virtual_stages)
        self.costs, self.comm = check_tuning(costs, comm)

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        chunks = self.stages_per_rank(num_stages, num_ranks)
        p = num_ranks
        groups = microbatch_groups(num_microbatches, p)

        def order(rank: int, kind: str) -> list[Action]:
            stages = list(range(chunks)) if kind == "F" else list(reversed(range(chunks)))
            return [
                Action(kind, chunk * p + rank, mb)  # type: ignore[arg-type]
                for group in groups for chunk in stages for mb in group
            ]

        drawn = [
            defer_weight_passes(
                one_forward_one_backward(
                    order(rank, "F"), order(rank, "B"), warmup=(chunks - 1) * len(groups[0]) + p - 1 - rank
                ),
                delay=rank,
            )
            for rank in range(p)
        ]
        # its drawn order leaves no slack, so a task that runs late lands on the critical path (benchmark 10
        # missed its prediction by 8-10 %): among orders of the same makespan, keep the least jitter-sensitive
        return tune_order(drawn, self.placement(num_stages, p), num_microbatches, self.costs, self.comm,
                          prefer_slack=True)
