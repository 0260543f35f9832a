"""Replay a plan on its dependency graph: the one dependency model of the code base.

Plan validation (deadlock detection) and the simulator both rest on :func:`replay`,
so "what waits for what" is decided in exactly one place
(:func:`pipesched.plan.lowering.inputs_of` plus "a rank runs its list in order").
By default they run its array version, :mod:`pipesched.plan.fast_replay`, which
gives the same times and the same :class:`Deadlock` and is tested against this one.

The graph has one node per action and two kinds of edges: the previous action
on the same rank, and the data dependencies. A topological walk (Kahn's
algorithm) visits every node once, so replay is linear in the number of
actions. Nodes the walk never reaches sit on a cycle or behind one: that is a
deadlock, and :class:`Deadlock` says which rank waits on what.

::

    rank 0:  F0.0 ──► F0.1 ──► B0.1 ──► B0.0        ──►  same-rank order
               │        │        ▲        ▲           ┄┄►  data dependency
    rank 1:    └┄┄► F1.0 ┄┄► ... ┘ ...
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipesched.plan.action import Action
from pipesched.plan.lowering import SkipEdge, dependencies


class Deadlock(ValueError):
    """A plan whose ranks would wait on each other forever.

    ``waiting`` lists, per stuck rank, the action it is at and the actions that
    one still waits for.
    """

    def __init__(self, waiting: list[tuple[int, Action, tuple[Action, ...]]]):
        self.waiting = waiting
        parts = [
            f"rank {rank} at {action} waits for {', '.join(map(str, blockers))}"
            for rank, action, blockers in waiting
        ]
        super().__init__(
            "plan would deadlock: " + "; ".join(parts)
            + ". Reorder the plan so that every action's inputs are produced before it on "
            "some rank that is not itself waiting."
        )


@dataclass(frozen=True)
class ReplayResult:
    """Start and end time of every action when the plan runs with the given costs.

    ``critical`` maps each action to the predecessor that decided its start time
    (``None`` when it started at 0), so the critical path can be walked back
    from the last action to finish.
    """

    start: dict[Action, float]
    end: dict[Action, float]
    rank_of: dict[Action, int]
    critical: dict[Action, Action | None]
    order: list[Action]

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)


def replay(
    plan: Sequence[Sequence[Action]],
    num_stages: int,
    cost: Callable[[Action], float] = lambda action: 1.0,
    comm: float = 0.0,
    skips: Sequence[SkipEdge] = (),
) -> ReplayResult:
    """Replay ``plan`` with ``cost(action)`` seconds per action.

    ``comm`` is added on every edge whose two ends run on different ranks.
    ``skips``: the model's skip connections, whose edges count like any
    other (see :func:`~pipesched.plan.lowering.inputs_of`).
    Every dependency must be present in the plan (the validator checks that
    first); a missing one raises ``KeyError``.
    """
    skips = tuple(skips)
    rank_of: dict[Action, int] = {}
    for rank, actions in enumerate(plan):
        for action in actions:
            rank_of[action] = rank

    own = {action: action for action in rank_of}
    waiting_on: dict[Action, int] = {}
    successors: dict[Action, list[Action]] = {action: [] for action in rank_of}
    inputs: dict[Action, tuple[Action, ...]] = {}
    ready: deque[Action] = deque()
    for actions in plan:
        previous: Action | None = None
        for action in actions:
            # the plan's own objects: later lookups then match by identity, not by __eq__
            inputs[action] = tuple(own.get(d, d) for d in dependencies(action, num_stages, skips))
            preds = list(inputs[action])
            if previous is not None:
                preds.append(previous)
            for pred in preds:
                successors[pred].append(action)
            waiting_on[action] = len(preds)
            if not preds:
                ready.append(action)
            previous = action

    start: dict[Action, float] = {}
    end: dict[Action, float] = {}
    critical: dict[Action, Action | None] = {}
    order: list[Action] = []
    rank_tail: list[Action | None] = [None] * len(plan)
    while ready:
        action = ready.popleft()
        rank = rank_of[action]
        begin, because = 0.0, None
        tail = rank_tail[rank]
        if tail is not None:
            begin, because = end[tail], tail
        for dep in inputs[action]:
            arrival = end[dep] + (comm if rank_of[dep] != rank else 0.0)
            if arrival > begin:
                begin, because = arrival, dep
        start[action] = begin
        end[action] = begin + float(cost(action))
        critical[action] = because
        rank_tail[rank] = action
        order.append(action)
        for succ in successors[action]:
            waiting_on[succ] -= 1
            if waiting_on[succ] == 0:
                ready.append(succ)

    if len(order) != len(rank_of):
        stuck = []
        for rank, actions in enumerate(plan):
            head = next((a for a in actions if a not in end), None)
            if head is not None:
                blockers = tuple(d for d in dependencies(head, num_stages, skips) if d not in end)
                stuck.append((rank, head, blockers))
        raise Deadlock(stuck)
    return ReplayResult(start, end, rank_of, critical, order)
