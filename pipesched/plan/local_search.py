"""Improve a plan by moving single actions off its critical path, checked by replay.

A list scheduler decides greedily, one free rank at a time, and cannot take a
decision back. Its plans are good but not always best: a weight-gradient pass
W started just before a backward arrives delays that backward and everything
waiting on it; a forward run ahead of a backward that was ready a moment
later stalls the ranks below. The critical path names such spots: wherever an
action on it waited for its *rank* (the action before it on the same rank)
rather than for its data, running it earlier may shorten the step.

:func:`improve` tries, for each such spot, to move the waiting action earlier
on its rank (one slot, or to where its inputs are ready), keeps the first
move that makes the run strictly better (a shorter makespan, or as long but
every rank done sooner in total), and repeats. A move may create a deadlock
(the replay then does not finish and the move is dropped) or break the
memory cap (checked on the moved rank's order, dropped too). The number of
replays is bounded by ``budget`` action-visits, so the time it takes is
bounded and the result deterministic.

Pure Python over :mod:`pipesched.plan`; no torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from pipesched.plan.action import Action, Plan, split_backwards
from pipesched.plan.lowering import inputs_of

__all__ = ["PlanGraph", "improve", "peak_held"]


def peak_held(row: Sequence[Action], footprint: Sequence[float]) -> float:
    """Most of ``footprint`` (per stage) one rank's order holds at once.

    A (stage, micro-batch) pair is held from its F until its W, or its B
    when the order has no W for it (an unsplit backward). Summed per pair, so
    two stages of one rank in flight for the same micro-batch count twice.
    """
    split = split_backwards(row)
    held = peak = 0.0
    for action in row:
        if action.kind == "F":
            held += footprint[action.stage]
        elif action.kind == "W" or (action.stage, action.microbatch) not in split:
            held -= footprint[action.stage]
        peak = max(peak, held)
    return peak


class PlanGraph:
    """A plan's actions as integers, with their durations and dependencies, for fast replays.

    :meth:`run` replays one ordering of the same actions (same ranks) in
    linear time, like :func:`pipesched.plan.replay.replay` but on integer
    ids, which is what makes trying many moves affordable.
    """

    def __init__(self, plan: Plan, num_stages: int, cost: Callable[[Action], float], comm: float):
        self.actions = [a for row in plan for a in row]
        self.index = {a: i for i, a in enumerate(self.actions)}
        self.num_ranks = len(plan)
        self.rank = [0] * len(self.actions)
        for r, row in enumerate(plan):
            for a in row:
                self.rank[self.index[a]] = r
        self.duration = [float(cost(a)) for a in self.actions]
        self.deps: list[list[tuple[int, float]]] = []
        for i, a in enumerate(self.actions):
            deps = []
            for edge in inputs_of(a, num_stages):
                j = self.index[edge.producer]
                deps.append((j, comm if self.rank[j] != self.rank[i] else 0.0))
            self.deps.append(deps)
        self.users: list[list[int]] = [[] for _ in self.actions]
        for i, deps in enumerate(self.deps):
            for j, _ in deps:
                self.users[j].append(i)

    def orders(self, plan: Plan) -> list[list[int]]:
        return [[self.index[a] for a in row] for row in plan]

    def plan(self, orders: Sequence[Sequence[int]]) -> Plan:
        return [[self.actions[i] for i in row] for row in orders]

    def run(self, orders: Sequence[Sequence[int]]) -> tuple[list[float], list[float], list[int]] | None:
        """Start, end and deciding predecessor (-1: none) of every action; ``None`` on a deadlock."""
        n = len(self.actions)
        after = [-1] * n
        waiting = [len(d) for d in self.deps]
        for row in orders:
            for k in range(1, len(row)):
                after[row[k - 1]] = row[k]
                waiting[row[k]] += 1
        ready = deque(i for i in range(n) if waiting[i] == 0)
        start, end, because = [0.0] * n, [0.0] * n, [-1] * n
        rank_end = [0.0] * self.num_ranks
        rank_last = [-1] * self.num_ranks
        done = 0
        while ready:
            i = ready.popleft()
            r = self.rank[i]
            begin, why = rank_end[r], rank_last[r]
            for j, hop in self.deps[i]:
                t = end[j] + hop
                if t > begin:
                    begin, why = t, j
            start[i], end[i], because[i] = begin, begin + self.duration[i], why
            rank_end[r], rank_last[r] = end[i], i
            done += 1
            for k in self.users[i]:
                waiting[k] -= 1
                if waiting[k] == 0:
                    ready.append(k)
            k = after[i]
            if k >= 0:
                waiting[k] -= 1
                if waiting[k] == 0:
                    ready.append(k)
        return (start, end, because) if done == n else None


def _score(end: list[float], orders: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(makespan, sum of the ranks' finishing times): lower is better, compared with a tolerance."""
    finish = [end[row[-1]] if row else 0.0 for row in orders]
    return max(finish, default=0.0), sum(finish)


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    eps = 1e-9 * max(1.0, abs(b[0]))
    if a[0] < b[0] - eps:
        return True
    return a[0] <= b[0] + eps and a[1] < b[1] - 1e-9 * max(1.0, abs(b[1]))


def improve(
    plan: Plan,
    num_stages: int,
    cost: Callable[[Action], float],
    comm: float,
    caps: Sequence[float] | None,
    footprint: Sequence[float],
    budget: int,
) -> tuple[Plan, int]:
    """Local search from ``plan``; returns the improved plan and the number of moves kept.

    ``caps`` (per rank, in ``footprint`` units) bounds what each rank may
    hold at once; ``None`` means no bound. ``budget`` bounds the work in
    action-visits (each replay costs the plan's action count).
    """
    if 2 * max(1, sum(len(row) for row in plan)) > budget:
        return plan, 0  # the first replay and one trial would overspend: no move can be tried
    graph = PlanGraph(plan, num_stages, cost, comm)
    orders = graph.orders(plan)
    n = max(1, len(graph.actions))
    result = graph.run(orders)
    if result is None:  # cannot happen for a validated plan; keep it as it is
        return plan, 0
    score = _score(result[1], orders)
    spent, kept = n, 0
    while spent + n <= budget:
        start, end, because = result
        moved = False
        for orders_try in _moves(graph, orders, start, end, because):
            if spent + n > budget:
                break
            spent += n
            changed = [r for r in range(len(orders)) if orders_try[r] is not orders[r]]
            if caps is not None and any(
                peak_held(graph.plan([orders_try[r]])[0], footprint) > caps[r] * (1 + 1e-9) for r in changed
            ):
                continue
            trial = graph.run(orders_try)
            if trial is None:
                continue
            trial_score = _score(trial[1], orders_try)
            if _better(trial_score, score):
                orders, result, score, moved = orders_try, trial, trial_score, True
                kept += 1
                break
        if not moved:
            break
    return graph.plan(orders), kept


def _moves(graph: PlanGraph, orders: list[list[int]], start: list[float], end: list[float],
           because: list[int]):
    """Candidate orderings, most promising first: each moves one rank-blocked critical action earlier."""
    position = {}
    for r, row in enumerate(orders):
        for k, i in enumerate(row):
            position[i] = (r, k)
    last = max(range(len(end)), key=end.__getitem__, default=None)
    path = []
    node = last
    while node is not None and node >= 0:
        path.append(node)
        node = because[node]
    seen: set[tuple[int, int, int]] = set()
    for v in path:  # from the end of the step backwards: late fixes first
        u = because[v]
        if u < 0 or graph.rank[u] != graph.rank[v] or any(j == u for j, _ in graph.deps[v]):
            continue  # v waited for data, not for its rank
        r, k = position[v]
        ready = max((end[j] + hop for j, hop in graph.deps[v]), default=0.0)
        row = orders[r]
        # the earliest slot whose occupant starts no sooner than v's inputs are ready
        target = k - 1
        while target > 0 and start[row[target - 1]] >= ready and not _depends(graph, v, row[target - 1]):
            target -= 1
        for slot in sorted({k - 1, target}):
            if slot < 0 or _depends_between(graph, v, row, slot, k):
                continue
            key = (r, v, slot)
            if key in seen:
                continue
            seen.add(key)
            new_row = row[:slot] + [v] + row[slot:k] + row[k + 1:]
            yield [new_row if q == r else orders[q] for q in range(len(orders))]


def _depends(graph: PlanGraph, v: int, u: int) -> bool:
    return any(j == u for j, _ in graph.deps[v])


def _depends_between(graph: PlanGraph, v: int, row: list[int], lo: int, hi: int) -> bool:
    """Whether ``v`` needs an action of ``row[lo:hi]`` (moving it before them would break the order)."""
    deps = {j for j, _ in graph.deps[v]}
    return any(i in deps for i in row[lo:hi])
