"""ZB-H1: 1F1B with each backward split and its weight-gradient half moved into the bubble.

Zero Bubble Pipeline Parallelism (Qi et al., ICLR 2024), the schedule with
1F1B's memory. A backward splits into B, the input gradient the previous rank
waits for, and W, the weight gradient nobody waits for. Rank ``r`` of ``p``
warms up like 1F1B (``p - 1 - r`` forwards), then alternates F and B, and runs
each W ``r`` backwards late: the deeper the rank, the later its W's, so they
land in the drain where 1F1B idles. With F = B = W and ``m >= p``::

    rank 0 │F0.0 F0.1 F0.2 F0.3  .   .   .  B0.0 W0.0 F0.4 B0.1 W0.1 ...
    rank 3 │ .   .   .  F3.0 B3.0 F3.1 B3.1 F3.2 B3.2 F3.3 B3.3 W3.0 F3.4 ...

makespan ``m(F + B + W) + (p - 1)(F + B - W)``, a third of 1F1B's bubble, and
no rank holds more than ``p`` micro-batches (1F1B's rank 0 peak): rank ``r``
holds its ``p - r`` of 1F1B plus ``r`` whose W is pending.

The order is drawn for F = B = W and free links. Given ``costs`` (a dict keyed
by ``(kind, stage)``, as :func:`pipesched.plan.simulate.simulate` takes) or
``comm``, and whenever the drawn order is off the best any order could do, the
schedule also tries orders built for those costs by
:func:`pipesched.plan.greedy.list_schedule`, within the same per-rank memory,
and keeps the fastest in simulation.
"""

from __future__ import annotations

from pipesched.plan.costs import Costs
from pipesched.plan.greedy import check_tuning, tune_order
from pipesched.plan.schedule import (
    Action,
    Plan,
    Schedule,
    defer_weight_passes,
    one_forward_one_backward,
    require_one_stage_per_rank,
)


class ZBH1(Schedule):
    name = "zb-h1"

    def __init__(self, costs: Costs | None = None, comm: float = 0.0):
        self.costs, self.comm = check_tuning(costs, comm)

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        require_one_stage_per_rank(self.name, num_stages, num_ranks)
        drawn = [
            defer_weight_passes(
                one_forward_one_backward(
                    [Action("F", rank, mb) for mb in range(num_microbatches)],
                    [Action("B", rank, mb) for mb in range(num_microbatches)],
                    warmup=num_ranks - 1 - rank,
                ),
                delay=rank,
            )
            for rank in range(num_ranks)
        ]
        return tune_order(drawn, self.placement(num_stages, num_ranks), num_microbatches, self.costs, self.comm)
