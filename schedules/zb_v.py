"""ZB-V: two stages per rank in a V, split backwards, near-zero bubble at 1F1B's memory (Qi et al., 2024, section 6).

Rank ``r`` of ``p`` holds stages ``r`` and ``2p - 1 - r``: rank 0 the first and
the last, rank ``p - 1`` the two middle ones. A micro-batch goes down the
ranks and back up, so its last forward and first backward run on rank 0,
next to where it started, and every rank sees its forwards and its backwards
at the same depth. Rank ``r``:

1. forwards ``2(p - r) - 1`` micro-batches through its first stage;
2. ``r`` times: a forward through its second stage, one through its first;
3. ``p - r`` times: forward, B and W through its second stage;
4. steady state, until every forward is done: F, B, W through the first
   stage, then F, B, W through the second;
5. drains the backwards, filling waits with the pending W's.

With F = B = W and ``m >= 2p`` the makespan is ``2m(F + B + W) + (p - 1)F``:
the only idle time is the first forward reaching each rank. A rank holds at
most ``2p`` (stage, micro-batch) pairs in flight, each half a 1F1B stage: the
activations of 1F1B's rank 0.

Below ``2p`` micro-batches there is no steady state; the rules above, minus the
micro-batches that do not exist, still give a valid order, and the schedule
also tries orders built by simulation (:func:`pipesched.plan.greedy.list_schedule`)
within the same per-rank memory and keeps the fastest. ``costs`` and ``comm``
(as :func:`pipesched.plan.simulate.simulate` takes them) tune that choice for
other costs than F = B = W.
"""

from __future__ import annotations

from pipesched.plan.costs import Costs
from pipesched.plan.greedy import check_tuning, tune_order
from pipesched.plan.schedule import Action, Plan, VShapeSchedule


class ZBV(VShapeSchedule):
    name = "zb-v"

    def __init__(self, costs: Costs | None = None, comm: float = 0.0):
        self.costs, self.comm = check_tuning(costs, comm)

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        placement = self.placement(num_stages, num_ranks)
        drawn = [v_order(rank, num_ranks, num_microbatches) for rank in range(num_ranks)]
        return tune_order(drawn, placement, num_microbatches, self.costs, self.comm)


def v_order(rank: int, num_ranks: int, num_microbatches: int) -> list[Action]:
    """Rank ``rank``'s ZB-V order, drawn for at least ``2p - 1`` micro-batches, then trimmed to the real ones."""
    p, m = num_ranks, num_microbatches
    drawn_for = max(m, 2 * p - 1)
    first, second = rank, 2 * p - 1 - rank
    done = {(kind, stage): 0 for kind in "FBW" for stage in (first, second)}
    order: list[Action] = []

    def run(kind: str, stage: int) -> None:
        mb = done[(kind, stage)]
        done[(kind, stage)] += 1
        if mb < m:
            order.append(Action(kind, stage, mb))  # type: ignore[arg-type]

    for _ in range(2 * (p - rank) - 1):
        run("F", first)
    for _ in range(rank):
        run("F", second)
        run("F", first)
    for _ in range(p - rank):
        for kind in "FBW":
            run(kind, second)
    while done[("F", first)] < drawn_for or done[("F", second)] < done[("F", first)]:
        if done[("F", first)] < drawn_for:
            run("F", first)
        run("B", first)
        run("W", first)
        for kind in "FBW":
            run(kind, second)
    for _ in range(rank):
        run("B", first)
        run("B", second)
    for _ in range(p - rank):
        run("B", first)
        run("W", first)
    for stage in (second, first):
        while done[("W", stage)] < done[("B", stage)]:
            run("W", stage)
    return order
