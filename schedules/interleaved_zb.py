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
fastest is kept (:func:`pipesched.plan.greedy.tune_order`).
"""

from __future__ import annotations

from pipesched.plan.greedy import check_tuning, tune_order
from pipesched.plan.simulate import Costs
from pipesched.plan.schedule import (
    Action,
    Plan,
    Schedule,
    defer_weight_passes,
    microbatch_groups,
    one_forward_one_backward,
)


class InterleavedZB(Schedule):
    name = "interleaved-zb"

    def __init__(self, virtual_stages: int = 2, costs: Costs | None = None, comm: float = 0.0):
        if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 2:
            raise ValueError(
                f"virtual_stages (stages per rank) must be an int >= 2, got {virtual_stages!r}; "
                f"for one stage per rank use 'zb-h1'"
            )
        self.virtual_stages = virtual_stages
        self.costs, self.comm = check_tuning(costs, comm)

    def default_num_stages(self, num_ranks: int) -> int:
        return self.virtual_stages * num_ranks

    def _chunks(self, num_stages: int, num_ranks: int) -> int:
        if num_stages % num_ranks or num_stages < 2 * num_ranks:
            raise ValueError(
                f"schedule {self.name!r} needs the number of stages to be a multiple >= 2 of the "
                f"number of ranks, got {num_stages} stages for {num_ranks} ranks: use a balance with "
                f"{2 * num_ranks} (or {3 * num_ranks}, ...) entries, or schedule='zb-h1' for one "
                f"stage per rank"
            )
        return num_stages // num_ranks

    def placement(self, num_stages: int, num_ranks: int) -> list[int]:
        self._chunks(num_stages, num_ranks)
        return [stage % num_ranks for stage in range(num_stages)]

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        chunks = self._chunks(num_stages, num_ranks)
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
        return tune_order(drawn, self.placement(num_stages, p), num_microbatches, self.costs, self.comm)
