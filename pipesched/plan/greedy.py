"""Orders found by simulation: a list scheduler, and the fastest of several candidate plans.

The zero-bubble orders of the papers are drawn for F = B = W and free links.
Off that point (too few micro-batches to reach the steady state, a heavy last
stage, slow links) a fixed order leaves bubbles that an order built *for the
costs* fills. :func:`list_schedule` builds one the way the zero-bubble paper's
heuristic does (Qi et al., 2024, section 3.2): it plays the step out in time
and, whenever a rank is free, picks what that rank runs next:

* warm up with as many forwards as the rank's in-flight limit allows;
* then alternate forward and backward (1F1B's rhythm, which keeps every
  rank fed and memory flat);
* when neither is ready, fill the wait with a pending weight-gradient pass
  (W), oldest first: no other rank waits for a W, so it costs nothing there;
* at the in-flight limit, run W passes (they release activations) instead of
  forwards.

The result is a plain plan: per rank, the order in which the simulation ran
its actions. Any order the simulation could run is free of deadlock, for every
cost, so a plan tuned for one set of costs stays valid (if slower) for others.

:func:`fastest` simulates candidate plans and keeps the quickest, breaking ties
by peak in-flight memory and then by candidate order, so a schedule can offer
its hand-drawn order first and keep it unless a tuned one is strictly better.

Pure Python over :mod:`pipesched.plan`; no torch.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Callable, Mapping, Sequence

from pipesched.plan.action import Action, Plan
from pipesched.plan.costs import Costs, as_cost_function, check_comm
from pipesched.plan.lowering import inputs_of
from pipesched.plan.ready_queue import ReadyQueue
from pipesched.plan.robust import jitter_makespan, no_slower_anywhere, reference_costs
from pipesched.plan.simulate import peak_inflight, simulate

__all__ = ["check_tuning", "fastest", "list_schedule", "span_bound", "tune_order", "unit_costs"]


def unit_costs(num_stages: int) -> dict[tuple[str, int], float]:
    """F = B = W = 1 on every stage: the zero-bubble papers' setting (an unsplit backward costs 2)."""
    return {(kind, stage): 1.0 for kind in "FBW" for stage in range(num_stages)}


def list_schedule(
    placement: Sequence[int],
    num_microbatches: int,
    limits: Sequence[int],
    costs: Costs | None = None,
    comm: float = 0.0,
    forward_priority: Callable[[Action], object] | None = None,
    fill_short_gaps: bool = True,
    footprint: Sequence[float] | None = None,
    prefer: str = "alternate",
    reserve: bool = False,
) -> Plan:
    """Play a step out in time with ``costs`` and return each rank's order (every backward split).

    Args:
        placement: rank of each stage (``len(placement)`` is the stage count).
        num_microbatches: micro-batches in the step.
        limits: per rank (one entry each), the most (stage, micro-batch) pairs
            it may hold in flight (forwarded, W not yet run); at least 1.
        costs, comm: as for :func:`pipesched.plan.simulate.simulate`; default
            :func:`unit_costs`.
        forward_priority: sort key among ready forwards (default: earliest
            micro-batch, then latest stage: depth first, toward the loss).
        fill_short_gaps: run a pending W in a wait even when a forward or
            backward arrives before the W would end (else wait for it).
        footprint: per stage, what one of its in-flight pairs weighs against
            ``limits`` (e.g. activation bytes); default 1 each, so ``limits``
            count pairs.
        prefer: when a forward and a backward are both ready, ``"alternate"``
            (1F1B's rhythm: the other kind than the rank's last), ``"backward"``
            (free memory and feed the ranks below first) or ``"forward"``
            (fill the pipeline first).
        reserve: admit a micro-batch to a rank (its forward through the rank's
            first stage) only when the limit has room for it on *all* the
            rank's stages at once. A looped or V rank holds a micro-batch's
            first stage until it has come back through the later ones, so
            without the reserve a tight limit can fill up with new micro-batches
            and starve; with it, any limit that fits one micro-batch works.
    """
    num_stages = len(placement)
    num_ranks = len(limits)
    weight = [1.0] * num_stages if footprint is None else [float(x) for x in footprint]
    if len(weight) != num_stages or any(not (math.isfinite(x) and x >= 0.0) for x in weight):
        raise ValueError(f"footprint must give each of the {num_stages} stages a finite weight >= 0, got {footprint!r}")
    if footprint is None and any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in limits):
        raise ValueError(f"limits must give every rank an in-flight limit >= 1, got {list(limits)!r}")
    if any(isinstance(n, bool) or not isinstance(n, (int, float)) or not n > 0 for n in limits):
        raise ValueError(f"limits must give every rank an in-flight limit > 0, got {list(limits)!r}")
    if prefer not in ("alternate", "backward", "forward"):
        raise ValueError(f"prefer must be 'alternate', 'backward' or 'forward', got {prefer!r}")
    if any(not 0 <= rank < num_ranks for rank in placement):
        raise ValueError(f"placement {list(placement)} names a rank outside 0..{num_ranks - 1} (one limit per rank)")
    costs = unit_costs(num_stages) if costs is None else costs
    cost = as_cost_function(costs, {(s, m) for s in range(num_stages) for m in range(num_microbatches)})
    forward_key = forward_priority or (lambda a: (a.microbatch, -a.stage))
    # actions by number ((stage * m + micro-batch) * 3 + kind), state in lists: no hashing per step
    actions, consumers, inputs = _split_graph(num_stages, num_microbatches)
    rank_of = [placement[a.stage] for a in actions]
    if actions and (isinstance(costs, Mapping) or callable(costs)):  # priced by (kind, stage): ask once a class
        prices = [[cost(actions[stage * num_microbatches * 3 + k]) for k in range(3)] for stage in range(num_stages)]
        duration = [price for stage in prices for _ in range(num_microbatches) for price in stage]
    else:
        duration = [cost(a) for a in actions]
    waiting = list(inputs)
    arrival = [0.0] * len(actions)

    def number(action: Action) -> int:
        return (action.stage * num_microbatches + action.microbatch) * 3 + _KIND_NUMBER[action.kind]

    # ready[r]: actions of rank r whose inputs are all scheduled, by when the last one arrives and by kind
    ready = [ReadyQueue((s for s in range(num_stages) if placement[s] == r), forward_key) for r in range(num_ranks)]
    releases = 0
    for i, a in enumerate(actions):
        if waiting[i] == 0:
            ready[rank_of[i]].release(a, 0.0, releases)
            releases += 1
    free_at = [0.0] * num_ranks
    inflight = [0.0] * num_ranks
    # with reserve: what each rank has promised to micro-batches it admitted (held, or still to come)
    committed = [0.0] * num_ranks
    whole = [math.fsum(weight[s] for s in range(num_stages) if placement[s] == r) for r in range(num_ranks)]
    entry = [min((s for s in range(num_stages) if placement[s] == r), default=-1) for r in range(num_ranks)]
    last_kind = [""] * num_ranks
    order: Plan = [[] for _ in range(num_ranks)]
    wakeups: list[tuple[float, int]] = [(0.0, r) for r in range(num_ranks)]
    left = len(actions)

    def run(rank: int, action: Action, start: float) -> None:
        nonlocal left, releases
        me = number(action)
        end = start + duration[me]
        free_at[rank] = end
        order[rank].append(action)
        ready[rank].take(action)
        left -= 1
        if action.kind == "F":
            inflight[rank] += weight[action.stage]
            if action.stage == entry[rank]:
                committed[rank] += whole[rank]
        elif action.kind == "W":
            inflight[rank] -= weight[action.stage]
            committed[rank] -= weight[action.stage]
        if action.kind != "W":
            last_kind[rank] = action.kind
        heapq.heappush(wakeups, (end, rank))
        for consumer in consumers[me]:
            target = rank_of[consumer]
            arrival[consumer] = max(arrival[consumer], end + (comm if target != rank else 0.0))
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                ready[target].release(actions[consumer], arrival[consumer], releases)
                releases += 1
                heapq.heappush(wakeups, (arrival[consumer], target))

    def admits(rank: int) -> Callable[[int], bool]:
        """Whether the rank's memory limit lets a forward of a stage start now."""
        cap = limits[rank] * (1 + 1e-9)
        if reserve:
            return lambda stage: stage != entry[rank] or committed[rank] + whole[rank] <= cap
        return lambda stage: inflight[rank] + weight[stage] <= cap

    while left:
        if not wakeups:
            raise ValueError(
                f"the in-flight limits {list(limits)} leave some rank unable to start the "
                f"forward it needs; raise them"
            )
        now, rank = heapq.heappop(wakeups)
        if free_at[rank] > now:
            continue
        queue = ready[rank]
        queue.advance(now)
        forward, blocked = queue.forward(admits(rank))
        backward = queue.backward()
        choice: Action | None = None
        if forward is not None and backward is not None:
            pick_forward = prefer == "forward" or (prefer == "alternate" and last_kind[rank] != "F")
            choice = forward if pick_forward else backward
        elif backward is not None or forward is not None:
            choice = backward if backward is not None else forward
        else:
            w = queue.weight()
            if w is not None:
                at_limit = blocked or inflight[rank] >= limits[rank]
                if fill_short_gaps or at_limit or queue.upcoming() >= now + duration[number(w)]:
                    choice = w
        if choice is not None:
            run(rank, choice, now)
    return order


_KIND_NUMBER = {"F": 0, "B": 1, "W": 2}


@functools.lru_cache(maxsize=16)
def _split_graph(
    num_stages: int, num_microbatches: int
) -> tuple[tuple[Action, ...], tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Every action of a step with every backward split, who consumes each, and how many inputs each has.

    Actions are numbered ``(stage * num_microbatches + microbatch) * 3 + kind``
    (F, B, W = 0, 1, 2); consumers are given by number. The same for every
    call with the same shape, and the costly part of a list schedule's
    set-up, so searches that try many rules share it.
    """
    actions = tuple(
        Action(kind, stage, mb)  # type: ignore[arg-type]
        for stage in range(num_stages) for mb in range(num_microbatches) for kind in "FBW"
    )
    index = {a: i for i, a in enumerate(actions)}
    consumers: list[list[int]] = [[] for _ in actions]
    inputs = []
    for i, a in enumerate(actions):
        edges = inputs_of(a, num_stages)
        inputs.append(len(edges))
        for edge in edges:
            consumers[index[edge.producer]].append(i)
    return actions, tuple(map(tuple, consumers)), tuple(inputs)


def fastest(candidates: Sequence[Plan], num_stages: int, costs: Costs, comm: float = 0.0) -> Plan:
    """The candidate with the shortest simulated makespan; ties go to less memory, then to the earlier one."""
    if not candidates:
        raise ValueError("fastest() needs at least one candidate plan")
    best, best_key = candidates[0], None
    for index, plan in enumerate(candidates):
        sim = simulate(plan, costs, comm=comm, num_stages=num_stages)
        key = (round(sim.makespan, 9), max(sim.peak_inflight, default=0), sum(sim.peak_inflight), index)
        if best_key is None or key < best_key:
            best, best_key = plan, key
    return best


def span_bound(plan: Sequence[Sequence[Action]], num_stages: int, costs: Costs, comm: float = 0.0) -> float:
    """A makespan no order of ``plan``'s actions on the same ranks can beat.

    The larger of the longest dependency chain and the busiest rank's *span*.

    A rank cannot start before the earliest moment any of its actions could
    (the longest dependency path into it), must then run all its work, and
    after its last action the longest path out of that action still has to
    run. So ``max over ranks of (earliest head + work + shortest tail)``
    bounds every order. It is tighter than the busiest rank's work, which is
    what lets a schedule tell an order that can still improve from one that
    cannot (1F1B under F = B is at this bound; so are ZB-H1 and ZB-V with
    F = B = W and enough micro-batches).

    Computed on arrays (:func:`pipesched.plan.fast_bound.span_bound_fast`, the
    same number); this walk through dicts answers where that one declines.
    """
    from pipesched.plan.fast_bound import span_bound_fast  # numpy loads with the first bound
    from pipesched.plan.plan_arrays import NotFast

    try:
        return span_bound_fast(plan, num_stages, costs, comm)
    except NotFast:
        return span_bound_reference(plan, num_stages, costs, comm)


def span_bound_reference(plan: Sequence[Sequence[Action]], num_stages: int, costs: Costs,
                         comm: float = 0.0) -> float:
    """:func:`span_bound` action by action through dicts: the yardstick of the array version."""
    actions = [a for row in plan for a in row]
    rank_of = {a: r for r, row in enumerate(plan) for a in row}
    cost = as_cost_function(costs, {(a.stage, a.microbatch) for a in actions if a.kind == "W"})
    duration = {a: cost(a) for a in actions}
    # producers before consumers: F by stage up, B by stage down, W last (per micro-batch)
    phase = {"F": 0, "B": 1, "W": 2}
    ordered = sorted(actions, key=lambda a: (phase[a.kind], a.stage if a.kind == "F" else -a.stage))
    edges = {a: inputs_of(a, num_stages) for a in actions}
    head: dict[Action, float] = {}
    for a in ordered:
        head[a] = max(
            (head[e.producer] + duration[e.producer] + (comm if rank_of[e.producer] != rank_of[a] else 0.0)
             for e in edges[a]),
            default=0.0,
        )
    tail: dict[Action, float] = {a: 0.0 for a in actions}
    for a in reversed(ordered):
        for e in edges[a]:
            hop = comm if rank_of[e.producer] != rank_of[a] else 0.0
            tail[e.producer] = max(tail[e.producer], hop + duration[a] + tail[a])
    chain = max((head[a] + duration[a] for a in actions), default=0.0)
    spans = (
        min(head[a] for a in row) + math.fsum(duration[a] for a in row) + min(tail[a] for a in row)
        for row in plan if row
    )
    return max([chain, *spans])


def check_tuning(costs: Costs | None, comm: float) -> tuple[Costs | None, float]:
    """Check a schedule's ``costs`` / ``comm`` options (the costs its order is tuned for)."""
    if costs is not None and (isinstance(costs, (str, bytes)) or not (callable(costs) or isinstance(costs, Mapping))):
        raise ValueError(
            f"costs must be a dict keyed by (kind, stage), e.g. {{('F', 0): 1.0, ('B', 0): 1.0, "
            f"('W', 0): 1.0}}, or a callable (kind, stage) -> seconds; got {type(costs).__name__}"
        )
    return costs, check_comm(comm)


def tune_order(
    handmade: Plan,
    placement: Sequence[int],
    num_microbatches: int,
    costs: Costs | None = None,
    comm: float = 0.0,
    *,
    alternatives: Sequence[Plan] = (),
    prefer_slack: bool = False,
) -> Plan:
    """``handmade``, unless another order is strictly faster under ``costs`` and ``comm``.

    The alternatives (list-scheduled orders, and ``alternatives`` the schedule
    drew itself) hold no rank to more micro-batches in flight than
    ``handmade`` does, so tuning never costs memory. When ``handmade`` already
    meets :func:`span_bound` nothing can beat it and nothing else is tried,
    unless ``prefer_slack`` and ``costs`` are given: then, among the orders of the shortest makespan,
    the one least sensitive to task-time jitter
    (:func:`pipesched.plan.robust.jitter_makespan`) wins.

    Without ``costs`` the order is tuned for F = B = W = 1, which the step
    will not run on exactly; a tuned order then replaces ``handmade`` (the
    papers' order, and torch's) only if it is no slower under every
    :func:`pipesched.plan.robust.reference_costs` table either (heavy first or
    last stage, W cheap or dear), so that not telling the costs never makes a
    schedule slower than the hand-drawn order would be.
    """
    num_stages = len(placement)
    told = costs is not None
    costs = unit_costs(num_stages) if costs is None else costs
    makespan = simulate(handmade, costs, comm=comm, num_stages=num_stages).makespan
    on_bound = makespan <= span_bound(handmade, num_stages, costs, comm) * (1 + 1e-9)
    if on_bound and not (prefer_slack and told):  # untold, the drawn order stands at the bound (and fast)
        return handmade
    limits = [peak_inflight(row) for row in handmade]
    candidates = [handmade, *(plan for plan in alternatives
                              if all(peak_inflight(row) <= limit for row, limit in zip(plan, limits)))]
    candidates += _list_scheduled(placement, num_microbatches, limits, costs, comm)
    if not told:
        tables = reference_costs(costs, num_stages)
        candidates = [plan for plan in candidates
                      if plan is handmade or no_slower_anywhere(plan, handmade, num_stages, tables, comm)]
        if len(candidates) == 1 and not on_bound:  # none robust: try orders built for the other costs
            candidates += [plan for table in tables
                           for plan in _list_scheduled(placement, num_microbatches, limits, table, comm)
                           if no_slower_anywhere(plan, handmade, num_stages, tables, comm)]
    if not prefer_slack:
        return fastest(candidates, num_stages, costs, comm)
    spans = [simulate(plan, costs, comm=comm, num_stages=num_stages).makespan for plan in candidates]
    shortest = [plan for plan, span in zip(candidates, spans) if span <= min(spans) * (1 + 1e-9)]
    if len(shortest) == 1:
        return shortest[0]
    # ties in jitter go to the earlier candidate (handmade first): min keeps the first of equal keys
    return min(shortest, key=lambda plan: round(jitter_makespan(plan, num_stages, costs, comm), 9))


def _list_scheduled(placement: Sequence[int], num_microbatches: int, limits: Sequence[int], costs: Costs,
                    comm: float) -> list[Plan]:
    """:func:`list_schedule`'s orders for ``costs``, filling short gaps and not; none where the limits starve it."""
    found = []
    for fill in (True, False):
        try:
            found.append(list_schedule(placement, num_microbatches, limits, costs, comm, fill_short_gaps=fill))
        except ValueError:  # those limits starve this heuristic; the hand-drawn order stands
            continue
    return found
