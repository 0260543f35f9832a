"""Exact balancing: cut a sequence of per-layer costs into stages so that the busiest part is as light as possible.

Two problems, both exact (no torch; the tuner, ``pipesched.balance`` and any
schedule may call them):

* :func:`balance_stages`: the *contiguous* partition of ``costs`` into ``k``
  non-empty stages minimising the largest stage sum (the bottleneck of a
  pipeline with one stage per rank). Method: the optimal bottleneck ``C*``
  is the smallest ``C`` for which the greedy sweep "fill a stage up to ``C``,
  then open the next" needs at most ``k`` stages, and ``C*`` is one of the
  ``n (n + 1) / 2`` window sums; a dynamic programme over prefixes with a
  binary search per cell finds it directly: ``best[j][i] = min_t max(best[j-1][t],
  S[i] - S[t])``, where the first argument grows and the second shrinks in
  ``t``, so the crossing point is found by bisection: O(k n log n). Among the
  partitions that reach ``C*`` it returns the one with the smallest sum of
  squared stage costs (a second dynamic programme over stages whose cost is
  at most ``C*``), so the non-bottleneck stages are even too, and the answer
  is deterministic. torchgpipe's ``blockpartition`` is a heuristic that can
  miss the optimum; this cannot (``tests/test_balance_plan.py`` checks both
  against brute force, and shows a case its heuristic would not reach).

* :func:`balance_ranks`: the same cut when several stages share a rank (a
  looped or V placement): minimise the largest *per-rank* sum of its stages'
  costs. A rank's stages are not adjacent, so the problem no longer
  decomposes by prefix; it is solved by depth-first branch and bound over
  the cut points, stage by stage, with the better of the placement-blind
  optimum and an even cut as the first incumbent, pruning a branch as soon
  as a rank's load, or the mean load of the ranks that own the stages still
  to place, reaches the incumbent; the search stops early at the lower bound
  ``max(total / ranks, largest single layer)``. Exact when it finishes within
  ``node_limit`` nodes: with random costs, 40 layers in 8 stages on 4 ranks
  (looped or V) finish in about 0.15 s on this machine. Past the limit
  (default 50 000 nodes, about a second) it returns the best cut found with
  ``exact=False``: a heuristic answer, never worse than the incumbent it
  started from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Balance", "balance_ranks", "balance_stages", "check_costs", "stage_sums"]

#: Relative slack when comparing float sums: prefix differences and direct sums round differently.
_RELATIVE_EPS = 1e-12


@dataclass(frozen=True)
class Balance:
    """A cut of the layers into stages and what it costs.

    * ``balance``: layers per stage (``Pipeline(..., balance=...)``).
    * ``stage_costs``: the summed cost of each stage.
    * ``rank_costs``: the summed cost of each rank's stages (one stage per rank: ``stage_costs``).
    * ``bottleneck``: ``max(rank_costs)``, what the cut minimises.
    * ``exact``: the bottleneck is proven optimal (False only when
      :func:`balance_ranks` hit its node limit).
    """

    balance: list[int]
    stage_costs: list[float]
    rank_costs: list[float]
    bottleneck: float
    exact: bool = True


def check_costs(costs: Sequence[float], num_stages: int, name: str = "costs") -> list[float]:
    """``costs`` as floats, or a ValueError naming what is wrong and how to fix it."""
    if isinstance(costs, (str, bytes)) or not isinstance(costs, Sequence):
        raise ValueError(f"{name} must be a list of per-layer costs (numbers >= 0), got {type(costs).__name__}")
    values = []
    for index, cost in enumerate(costs):
        try:
            value = float(cost)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(cost, bool) or not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{name}[{index}] = {cost!r}: every per-layer cost must be a finite number >= 0")
        values.append(value)
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"the number of stages must be an int >= 1, got {num_stages!r}")
    if len(values) < num_stages:
        raise ValueError(
            f"cannot cut {len(values)} layers into {num_stages} non-empty stages; "
            f"use fewer stages (ranks) or a module with more layers"
        )
    return values


def stage_sums(costs: Sequence[float], balance: Sequence[int]) -> list[float]:
    """The summed cost of each stage of ``balance`` (layers per stage)."""
    sums, first = [], 0
    for count in balance:
        sums.append(math.fsum(costs[first : first + count]))
        first += count
    return sums


def balance_stages(costs: Sequence[float], num_stages: int) -> Balance:
    """The contiguous cut of ``costs`` into ``num_stages`` non-empty stages with the smallest largest stage.

    Exact, O(k n log n) for the bottleneck plus O(k n w) for the tie-break
    (``w``: the most layers a stage of cost ``<= C*`` can hold). Ties in the
    bottleneck go to the cut with the smallest sum of squared stage costs,
    then to the earliest cut.
    """
    values = check_costs(costs, num_stages)
    bottleneck = _min_bottleneck(values, num_stages)
    balance = _even_under_cap(values, num_stages, bottleneck)
    sums = stage_sums(values, balance)
    return Balance(balance, sums, list(sums), max(sums))


def _min_bottleneck(values: list[float], k: int) -> float:
    """``min over cuts of max stage sum`` by the prefix dynamic programme (see the module docstring)."""
    n = len(values)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    # best[i]: the optimal bottleneck of the first i layers in j stages (j = the loop's stage count)
    best = [prefix[i] if i >= 1 else math.inf for i in range(n + 1)]  # j = 1
    for j in range(2, k + 1):
        new = [math.inf] * (n + 1)
        for i in range(j, n - (k - j) + 1):
            # t in [j-1, i-1]: first j-1 stages take t layers, the last stage takes t..i
            lo, hi = j - 1, i - 1
            # best[t] is non-decreasing in t, prefix[i] - prefix[t] non-increasing: find the crossing
            while lo < hi:
                mid = (lo + hi) // 2
                if best[mid] >= prefix[i] - prefix[mid]:
                    hi = mid
                else:
                    lo = mid + 1
            value = max(best[lo], prefix[i] - prefix[lo])
            if lo > j - 1:
                value = min(value, max(best[lo - 1], prefix[i] - prefix[lo - 1]))
            new[i] = value
        best = new
    return best[n]


def _even_under_cap(values: list[float], k: int, cap: float) -> list[int]:
    """Among cuts whose every stage costs ``<= cap``, the one with the least sum of squares (earliest on ties)."""
    n = len(values)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    limit = cap * (1 + _RELATIVE_EPS) + _RELATIVE_EPS
    # score[j][i]: (least sum of squared stage costs, then of squared layer counts) for the first i
    # layers in j stages, each <= cap; the second key spreads layers evenly when costs tie (all zero)
    none = (math.inf, math.inf)
    score = [[none] * (n + 1) for _ in range(k + 1)]
    back = [[-1] * (n + 1) for _ in range(k + 1)]
    score[0][0] = (0.0, 0)
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            # stage j holds layers t..i-1; walk t down while the stage stays under the cap
            for t in range(i - 1, j - 2, -1):
                stage = prefix[i] - prefix[t]
                if stage > limit:
                    break
                previous = score[j - 1][t]
                if previous[0] == math.inf:
                    continue
                candidate = (previous[0] + stage * stage, previous[1] + (i - t) ** 2)
                if _better(candidate, score[j][i]):
                    score[j][i], back[j][i] = candidate, t
    if score[k][n][0] == math.inf:  # cannot happen for cap = the optimum; guard against float surprises
        raise AssertionError(f"no cut of {values} into {k} stages under {cap}")
    balance, i = [], n
    for j in range(k, 0, -1):
        t = back[j][i]
        balance.append(i - t)
        i = t
    return balance[::-1]


def _better(candidate: tuple[float, float], current: tuple[float, float]) -> bool:
    """``candidate`` < ``current``, the first key compared with a relative slack for rounding."""
    if current[0] == math.inf:
        return True
    slack = _RELATIVE_EPS * max(1.0, current[0])
    if candidate[0] < current[0] - slack:
        return True
    return abs(candidate[0] - current[0]) <= slack and candidate[1] < current[1]


def balance_ranks(
    costs: Sequence[float],
    placement: Sequence[int],
    *,
    node_limit: int = 50_000,
) -> Balance:
    """The contiguous cut into ``len(placement)`` stages minimising the largest per-rank sum.

    ``placement[s]`` is the rank of stage ``s`` (a schedule's
    ``placement(num_stages, num_ranks)``): looped ``[0, 1, 0, 1]``, V-shaped
    ``[0, 1, 1, 0]``. A rank's cost is the sum of its stages' costs. With one
    stage per rank this is :func:`balance_stages`.

    Branch and bound, exact unless more than ``node_limit`` search nodes are
    needed, in which case the best cut found is returned with
    ``exact=False`` (see the module docstring). Worst case exponential in
    the stage count; in practice the bound prunes almost everything.
    """
    num_stages = len(placement)
    values = check_costs(costs, num_stages)
    ranks = sorted(set(placement))
    if ranks != list(range(len(ranks))):
        raise ValueError(f"placement {list(placement)} must use ranks 0..R-1, each at least once")
    num_ranks = len(ranks)
    if num_ranks == num_stages:
        result = balance_stages(values, num_stages)
        by_rank = [0.0] * num_ranks
        for stage, rank in enumerate(placement):
            by_rank[rank] = result.stage_costs[stage]
        return Balance(result.balance, result.stage_costs, by_rank, max(by_rank))
    if isinstance(node_limit, bool) or not isinstance(node_limit, int) or node_limit < 1:
        raise ValueError(f"node_limit must be an int >= 1, got {node_limit!r}")

    n = len(values)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)

    def rank_loads(balance: Sequence[int]) -> list[float]:
        loads = [0.0] * num_ranks
        for stage, cost in enumerate(stage_sums(values, balance)):
            loads[placement[stage]] += cost
        return loads

    # incumbents: the placement-blind optimum and the even cut; keep the better
    starts = [balance_stages(values, num_stages).balance,
              [n // num_stages + (1 if i < n % num_stages else 0) for i in range(num_stages)]]
    best_balance = min(starts, key=lambda b: (max(rank_loads(b)), b))
    best = max(rank_loads(best_balance))
    floor = max(prefix[n] / num_ranks, max(values))  # no cut beats this
    eps = _RELATIVE_EPS * max(1.0, prefix[n])
    # ranks that still own a stage at or after each stage index: the rest of the layers goes to them
    later = [sorted(set(placement[s:])) for s in range(num_stages + 1)]
    nodes = 0
    exhausted = True
    loads = [0.0] * num_ranks
    cut = [0] * num_stages

    def search(stage: int, first: int) -> bool:
        """Place stages ``stage..`` starting at layer ``first``; True when the search must stop."""
        nonlocal best, best_balance, nodes, exhausted
        nodes += 1
        if nodes > node_limit:
            exhausted = False
            return True
        rank = placement[stage]
        if stage == num_stages - 1:
            load = loads[rank] + prefix[n] - prefix[first]
            worst = max(max(loads), load)
            if worst < best - eps:
                cut[stage] = n - first
                best, best_balance = worst, list(cut)
            return best <= floor + eps
        remaining = num_stages - stage - 1
        ends = range(first + 1, n - remaining + 1)
        # heaviest-first tends to find a tight incumbent early; try ends close to the ideal share first
        ideal = prefix[first] + (prefix[n] - prefix[first]) / (remaining + 1)
        for end in sorted(ends, key=lambda e: (abs(prefix[e] - ideal), e)):
            added = prefix[end] - prefix[first]
            if loads[rank] + added >= best - eps:
                continue
            # the layers after ``end`` go to the ranks that own a later stage: one of them gets their mean
            owners = later[stage + 1]
            share = (math.fsum(loads[r] for r in owners) + (added if rank in owners else 0.0)
                     + prefix[n] - prefix[end]) / len(owners)
            if share >= best - eps:
                continue
            loads[rank] += added
            cut[stage] = end - first
            stop = search(stage + 1, end)
            loads[rank] -= added
            if stop:
                return True
        return False

    search(0, 0)
    by_rank = rank_loads(best_balance)
    return Balance(best_balance, stage_sums(values, best_balance), by_rank, max(by_rank), exact=exhausted)
