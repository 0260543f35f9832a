"""The span bound of :func:`pipesched.plan.greedy.span_bound` on arrays: the same number, a pass per (kind, stage).

Every dependency edge stays within a micro-batch and goes one way along
F by stage up, B by stage down, W after its B. Sorting the actions once
into those (kind, stage) groups, in that order, lets the longest path into
each action (its *head*) be computed group by group, for all micro-batches
at once, and the longest path out of it (its *tail*) in the reverse order.
Each value comes out of the same additions and maxima as in the reference,
so the bound is identical, not close. Schedules that tune their order
(ZB-H1, ZB-V) ask for the bound on every plan they build.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pipesched.plan.action import Action
from pipesched.plan.costs import Costs
from pipesched.plan.fast_simulate import action_durations
from pipesched.plan.plan_arrays import NotFast, PlanArrays

__all__ = ["span_bound_fast"]


def span_bound_fast(plan: Sequence[Sequence[Action]], num_stages: int, costs: Costs, comm: float = 0.0) -> float:
    """:func:`~pipesched.plan.greedy.span_bound` of ``plan``; :class:`NotFast` where the reference must answer."""
    arrays = PlanArrays(plan, num_stages)
    size = arrays.size
    if not size:
        return 0.0
    duration = action_durations(arrays, costs)
    deps, wanted = arrays.dependencies()
    if (wanted & (deps < 0)).any():
        raise NotFast  # an input no action makes: the reference raises for it
    present = deps >= 0
    producer = np.where(present, deps, 0)
    hop = np.where(present & (arrays.rank[producer] != arrays.rank[:, None]), comm, 0.0)
    stages = arrays.num_stages
    group = np.where(arrays.kind == 0, arrays.stage,
                     np.where(arrays.kind == 1, 2 * stages - 1 - arrays.stage, 2 * stages + arrays.stage))
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    batches = np.split(order, bounds)
    head = np.zeros(size)
    for batch in batches:  # producers before consumers
        best = np.zeros(batch.size)
        latest = np.full(batch.size, -np.inf)
        for column in range(deps.shape[1]):
            source, has = producer[batch, column], present[batch, column]
            latest = np.where(has, np.maximum(latest, (head[source] + duration[source]) + hop[batch, column]), latest)
        head[batch] = np.where(np.isneginf(latest), best, latest)
    tail = np.zeros(size)
    for batch in reversed(batches):  # consumers before producers
        for column in range(deps.shape[1]):
            has = present[batch, column]
            consumers = batch[has]
            source = producer[consumers, column]
            reach = (hop[consumers, column] + duration[consumers]) + tail[consumers]
            tail[source] = np.maximum(tail[source], reach)
    chain = float((head + duration).max())
    spent = duration.tolist()
    spans = []
    for offset, length in zip(arrays.offsets.tolist(), arrays.lengths.tolist()):
        if length:
            row = slice(offset, offset + length)
            spans.append(float(head[row].min()) + math.fsum(spent[row]) + float(tail[row].min()))
    return max([chain, *spans])
