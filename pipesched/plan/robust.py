"""Choosing among orders beyond one table of costs: other plausible costs, and task-time jitter.

A schedule's order is tuned on one cost table, but it runs on real tasks:

* **Costs it was not told.** A schedule built without ``costs`` is tuned for
  F = B = W = 1 on every stage; a real model has a heavy last stage (a
  language model's head and loss), a heavy first one (the embedding), W
  cheaper or dearer than B. An order that wins by one unit at F = B = W can
  lose by one to the paper's order (torch's) there. :func:`reference_costs`
  are such tables, derived from the one the order is tuned for, and
  :func:`no_slower_anywhere` keeps a tuned order only where it is no slower
  than the hand-drawn one under every one of them.
* **Jitter.** Two orders of equal makespan can differ in *slack*: one keeps
  every rank busy from its first task to its last, so any task that runs late
  (a sleep that wakes late, a GIL wait) lands on the critical path; another
  leaves room that absorbs it. :func:`jitter_makespan` replays an order with
  each task's duration stretched at random (a fixed seed, so plans stay
  deterministic) and reports the mean makespan: the smaller, the less the
  order passes jitter on to the step.

Pure Python over :mod:`pipesched.plan`; no torch.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pipesched.plan.action import Action, Plan, split_backwards
from pipesched.plan.costs import Costs, as_cost_function
from pipesched.plan.replay import replay
from pipesched.plan.simulate import simulate

__all__ = ["jitter_makespan", "no_slower_anywhere", "reference_costs"]

#: How much heavier a heavy first or last stage is (a head 1.5 to 3x a block), and W's scale when cheap or dear.
HEAVY = (1.5, 2.0, 3.0)
W_SCALES = (0.5, 2.0)


def reference_costs(costs: Costs, num_stages: int) -> list[dict[tuple[str, int], float]]:
    """Cost tables around ``costs``: a heavy first or last stage, W cheap or dear.

    Each is ``costs`` with one change: the first or the last stage's F, B and W
    1.5, 2 or 3 times as long, or every W half or twice as long. B is priced as the
    input-gradient half of a split backward, as the zero-bubble orders run it.
    """
    cost = as_cost_function(costs, {(s, 0) for s in range(num_stages)})
    base = {(kind, s): cost(Action(kind, s, 0)) for kind in "FBW" for s in range(num_stages)}  # type: ignore[arg-type]
    out = []
    for stage in (0, num_stages - 1):
        for heavy in HEAVY:
            out.append({(kind, s): value * (heavy if s == stage else 1.0) for (kind, s), value in base.items()})
    for scale in W_SCALES:
        out.append({(kind, s): value * (scale if kind == "W" else 1.0) for (kind, s), value in base.items()})
    return out


def no_slower_anywhere(
    candidate: Plan, reference: Plan, num_stages: int, tables: Sequence[Costs], comm: float = 0.0,
) -> bool:
    """Whether ``candidate`` simulates no slower than ``reference`` under every one of ``tables``."""
    for table in tables:
        if simulate(candidate, table, comm=comm, num_stages=num_stages).makespan > \
                simulate(reference, table, comm=comm, num_stages=num_stages).makespan * (1 + 1e-9):
            return False
    return True


def jitter_makespan(
    plan: Plan, num_stages: int, costs: Costs, comm: float = 0.0, *, samples: int = 16, seed: int = 0,
    late_share: float = 0.1, late_by: float = 0.5,
) -> float:
    """Mean makespan of ``plan`` over ``samples`` replays in which tasks run late at random.

    In each replay every task takes its cost, and a ``late_share`` of them
    (drawn independently) take up to ``1 + late_by`` times as long (uniform):
    the shape of what CPU ranks measure (a median close to the calibrated
    cost, a tail of late wake-ups; ``benchmarks/RESULTS.md``, benchmark 10).
    The seed is fixed, so the same plan always scores the same and schedules
    that choose by it stay deterministic.
    """
    cost = as_cost_function(costs, split_backwards(a for row in plan for a in row))
    draw = random.Random(seed)
    actions = [a for row in plan for a in row]
    total = 0.0
    for _ in range(samples):
        late = {a: 1.0 + late_by * draw.random() for a in actions if draw.random() < late_share}
        total += replay(plan, num_stages, lambda a: cost(a) * late.get(a, 1.0), comm).makespan
    return total / samples
