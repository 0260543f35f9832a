"""DualPipeV: ZB-V's placement with forward and backward of different micro-batches paired (DeepSeek-V3, 2024).

DualPipe (DeepSeek-AI, "DeepSeek-V3 Technical Report", section 3.2.1) feeds
micro-batches from both ends of the pipeline; DualPipeV ("cut in half", as in
deepseek-ai/DualPipe) gets the same effect on half the ranks by folding the
stages into a V: rank ``r`` of ``p`` holds stages ``r`` and ``2p - 1 - r``. In
the steady state every forward of one stage is paired with a whole backward
of the *other* stage, of a different micro-batch, so that an engine able to
overlap the two (one's communication under the other's compute) hides the
all-to-all of expert parallelism; here the pair simply runs back to back.
Rank ``r``:

1. ``2(p - r - 1)`` forwards through its first stage;
2. ``r + 1`` times: a forward through each stage;
3. ``p - r - 1`` times: a split B through its second stage, a pending W, a
   forward through its second stage;
4. ``m - 2p + r + 1`` times: (F first stage, B second stage), then
   (F second stage, B first stage): the paired steady state;
5. ``p - r - 1`` times: B second stage, then (F second stage, B first stage);
6. ``r + 1`` times: B second stage, B first stage, splitting the backwards
   from the middle of this phase on (so their W's fill the drain);
7. ``p - r - 1`` times: a pending W, then B first stage;
8. the remaining W's.

It needs ``m >= 2p`` micro-batches for that steady state. With fewer there is
nothing to pair, and it runs ZB-V's order (same placement; see
the registered ``"zb-v"``), which is valid and tuned for every ``m``.
A rank holds at most ``2p + 1`` (stage, micro-batch) pairs.
"""

from __future__ import annotations

from pipesched.plan.schedule import Action, Plan, VShapeSchedule
from pipesched.plan.registry import get_schedule


class DualPipeV(VShapeSchedule):
    name = "dualpipe-v"

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        self.placement(num_stages, num_ranks)
        if num_microbatches < 2 * num_ranks:
            return get_schedule("zb-v").plan(num_stages, num_microbatches, num_ranks)  # plug-ins import only the plan
        return [_order(rank, num_ranks, num_microbatches) for rank in range(num_ranks)]


def _order(rank: int, p: int, m: int) -> list[Action]:
    first, second = rank, 2 * p - 1 - rank
    started = {("F", first): 0, ("F", second): 0, ("B", first): 0, ("B", second): 0}
    pending_w: list[Action] = []
    order: list[Action] = []

    def run(kind: str, stage: int, split: bool = False) -> None:
        mb = started[(kind, stage)]
        started[(kind, stage)] += 1
        order.append(Action(kind, stage, mb))  # type: ignore[arg-type]
        if split:
            pending_w.append(Action("W", stage, mb))

    def weight() -> None:
        if pending_w:
            order.append(pending_w.pop(0))

    for _ in range(2 * (p - rank - 1)):
        run("F", first)
    for _ in range(rank + 1):
        run("F", first)
        run("F", second)
    for _ in range(p - rank - 1):
        run("B", second, split=True)
        weight()
        run("F", second)
    for _ in range(m - 2 * p + rank + 1):
        run("F", first)
        run("B", second)
        run("F", second)
        run("B", first)
    for _ in range(p - rank - 1):
        run("B", second)
        run("F", second)
        run("B", first)
    split = False
    for i in range(rank + 1):
        # half-way through, switch to split backwards (the odd ranks one backward earlier)
        split = split or (i == (rank + 1) // 2 and rank % 2 == 1)
        run("B", second, split)
        split = split or (i == (rank + 1) // 2 and rank % 2 == 0)
        run("B", first, split)
    for _ in range(p - rank - 1):
        weight()
        run("B", first, split)
    while pending_w:
        weight()
    return order
