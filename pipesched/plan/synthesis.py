"""A plan built for given per-stage costs under a per-rank memory cap: what ``"auto"`` runs.

The built-in schedules are drawn for one point (F = B = W, free links, no
memory cap but their own). Off that point a plan built *for the costs* does
better: a heavy stage sets the pace, a cheap W fills less of a bubble, a slow
link wants more micro-batches in flight. :func:`synthesise` searches for the
shortest simulated step:

1. the *seeds* (the built-in plans of the placement, which the caller passes
   in) are simulated with the costs; those within the cap are the baseline;
2. :func:`pipesched.plan.greedy.list_schedule` builds plans with several
   priority rules (forward/backward preference, when to run W) and in-flight
   limits (the seeds' own, larger ones up to the cap);
3. :func:`pipesched.plan.local_search.improve` moves actions off the best
   plan's critical path while that shortens the step.

It keeps a new plan only when it is strictly faster than every seed that fits,
so the result is never worse in simulation than the best built-in; and it
stops as soon as a plan meets :func:`pipesched.plan.greedy.span_bound`, which
no order can beat. Everything is deterministic (no clock, no randomness), and
the work of step 3 is bounded by a budget of action-visits.

Costs are those of :func:`pipesched.plan.simulate.simulate` (a mapping keyed
by ``(kind, stage)`` or a callable), with one addition: a mapping may carry
``("bytes", s)``, the activation bytes one micro-batch keeps on stage ``s``
from its F to its W (or its unsplit B). With bytes for every stage the memory
cap is in bytes per rank; without, it counts (stage, micro-batch) pairs in
flight per rank, as :attr:`pipesched.plan.simulate.SimResult.peak_inflight`
does. A mapping with no ``("W", s)`` for a stage gets unsplit backwards there
(``("B", s)`` is then the whole backward, as in the simulator).

Pure Python over :mod:`pipesched.plan`; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from pipesched.plan.action import Action, Plan, split_backwards
from pipesched.plan.costs import Costs, as_cost_function, check_comm
from pipesched.plan.greedy import list_schedule, span_bound
from pipesched.plan.local_search import improve, peak_held
from pipesched.plan.schedule import validate_plan
from pipesched.plan.simulate import peak_inflight, simulate

__all__ = ["BYTES", "MemoryLimit", "Synthesis", "check_costs", "check_memory_limit", "stage_footprint", "synthesise"]

#: The key kind under which a cost mapping carries a stage's activation bytes per micro-batch.
BYTES = "bytes"

#: ``None`` (no cap), one number for every rank, or one per rank.
MemoryLimit = Union[None, float, Sequence[float]]

#: Action-visits the local search may spend (each replay visits every action once).
DEFAULT_BUDGET = 60_000


@dataclass(frozen=True)
class Synthesis:
    """What :func:`synthesise` found.

    * ``plan``: per rank, the order of its actions (validated);
    * ``makespan``: its simulated step time with the given costs;
    * ``peak``: per rank, the most it holds at once, in the cap's units;
    * ``method``: how it was found (a seed's name, or the list scheduler's
      rule, plus the local-search moves kept);
    * ``baseline`` / ``baseline_makespan``: the fastest seed within the cap
      (``None`` when none fits), what the result is never worse than;
    * ``bound``: :func:`~pipesched.plan.greedy.span_bound`, no order can beat it.
    """

    plan: Plan
    makespan: float
    peak: list[float]
    method: str
    baseline: str | None
    baseline_makespan: float | None
    bound: float


def check_costs(costs: Any, num_stages: int) -> Costs:
    """``costs`` as :func:`synthesise` needs them, or a ``ValueError`` that says what is missing."""
    if isinstance(costs, Mapping):
        missing = [(kind, s) for s in range(num_stages) for kind in "FB" if (kind, s) not in costs]
        if missing:
            raise ValueError(
                f"costs has no entry for {', '.join(map(repr, missing[:4]))}"
                f"{' ...' if len(missing) > 4 else ''}: give ('F', s) and ('B', s) seconds for every stage "
                f"s in 0..{num_stages - 1} (and ('W', s) to let backwards split), e.g. "
                f"{{('F', 0): 1.0, ('B', 0): 1.0, ('W', 0): 1.0, ...}}"
            )
        stage_footprint(costs, num_stages)
        return costs
    if callable(costs) and not isinstance(costs, (str, bytes)):
        return costs
    raise ValueError(
        f"costs must be a dict keyed by (kind, stage), e.g. {{('F', 0): 1.0, ('B', 0): 2.0, ('W', 0): 1.0}}, "
        f"or a callable (kind, stage) -> seconds; got {type(costs).__name__}"
    )


def stage_footprint(costs: Costs, num_stages: int) -> list[float] | None:
    """Per stage, the bytes one in-flight micro-batch holds, when ``costs`` carries them; else ``None``."""
    if not isinstance(costs, Mapping):
        return None
    given = [s for s in range(num_stages) if (BYTES, s) in costs]
    if not given:
        return None
    if len(given) != num_stages:
        lacking = [s for s in range(num_stages) if (BYTES, s) not in costs]
        raise ValueError(
            f"costs gives ('bytes', s) for stages {given} but not for {lacking}; give the activation "
            f"bytes of every stage, or of none (the memory limit then counts micro-batches)"
        )
    footprint = []
    for s in range(num_stages):
        raw = costs[(BYTES, s)]
        value = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else math.nan
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"costs[('bytes', {s})] must be a number of bytes >= 0, got {raw!r}")
        footprint.append(value)
    return footprint


def check_memory_limit(memory_limit: Any) -> MemoryLimit:
    """``None``, a number > 0, or a sequence of them (one per rank); else a ``ValueError``."""
    def number(value: Any) -> bool:
        return (not isinstance(value, bool) and isinstance(value, (int, float))
                and math.isfinite(value) and value > 0)

    if memory_limit is None or number(memory_limit):
        return memory_limit
    if isinstance(memory_limit, Sequence) and not isinstance(memory_limit, (str, bytes)) and memory_limit \
            and all(number(v) for v in memory_limit):
        return tuple(memory_limit)
    raise ValueError(
        f"memory_limit must be None (no cap), a number > 0 or a list of them (one per rank): "
        f"micro-batches in flight per rank, or bytes when the costs carry ('bytes', s); got {memory_limit!r}"
    )


def synthesise(
    placement: Sequence[int],
    num_microbatches: int,
    costs: Costs,
    *,
    comm: float = 0.0,
    memory_limit: MemoryLimit = None,
    seeds: Sequence[tuple[str, Plan]] = (),
    budget: int = DEFAULT_BUDGET,
) -> Synthesis:
    """The fastest plan found for ``costs`` within ``memory_limit``, never slower than a fitting seed.

    Args:
        placement: rank of each stage.
        num_microbatches: micro-batches in the step.
        costs: a mapping keyed by ``(kind, stage)`` (optionally with
            ``("bytes", s)``) or a callable, as the module docstring says.
        comm: seconds added to every cross-rank dependency.
        memory_limit: per-rank cap (see :func:`check_memory_limit`); ``None``: none.
        seeds: ``(name, plan)`` pairs to start from and to beat, e.g. the
            built-in schedules' plans for the same placement.
        budget: action-visits the local search may spend.

    Raises:
        ValueError: bad costs, limit or shape, or a cap so low that no plan
            found fits (the message gives the least that works).
    """
    num_stages = len(placement)
    num_ranks = 1 + max(placement, default=-1)
    costs = check_costs(costs, num_stages)
    comm = check_comm(comm)
    memory_limit = check_memory_limit(memory_limit)
    footprint = stage_footprint(costs, num_stages)
    unit = "bytes" if footprint is not None else "micro-batches in flight"
    footprint = footprint or [1.0] * num_stages
    caps = _caps(memory_limit, num_ranks)
    unsplit = _unsplit_stages(costs, num_stages)
    search_costs = _with_free_weight_passes(costs, unsplit)

    def fits(peaks: Sequence[float]) -> bool:
        return caps is None or all(h <= c * (1 + 1e-9) for h, c in zip(peaks, caps))

    def makespan_of(plan: Plan) -> float | None:
        """The plan's simulated makespan; ``None`` when the costs cannot price it (a split plan without W costs)."""
        try:
            return simulate(plan, costs, comm=comm, num_stages=num_stages).makespan
        except ValueError:  # unpriceable, or not a full plan of these actions (a deadlock cannot come from a seed)
            return None

    best: tuple[tuple[float, float, float, int], Plan, str, list[float]] | None = None
    baseline: tuple[str, float] | None = None
    tried = 0

    def consider(plan: Plan, method: str) -> None:
        nonlocal best, tried
        tried += 1
        peaks = [peak_held(row, footprint) for row in plan]
        if not fits(peaks):
            return
        makespan = makespan_of(plan)
        if makespan is None:
            return
        key = (round(makespan, 9), round(max(peaks, default=0.0), 9), round(sum(peaks), 9), tried)
        if best is None or key < best[0]:
            best = (key, plan, method, peaks)

    seeds = [(name, [list(row) for row in plan]) for name, plan in seeds]
    for name, plan in seeds:
        consider(plan, name)
    if best is not None:
        baseline = (best[2], best[0][0])

    every = [[Action(kind, s, mb) for s in range(num_stages) if placement[s] == r  # type: ignore[arg-type]
              for mb in range(num_microbatches) for kind in "FBW"] for r in range(num_ranks)]
    bound = span_bound(_strip(every, unsplit), num_stages, costs, comm)

    def at_bound() -> bool:
        return best is not None and best[0][0] <= bound * (1 + 1e-9)

    if not at_bound():
        for limits, weights, prefer, fill, reserve in _variants(
                placement, num_microbatches, footprint, caps, seeds, best):
            try:
                plan = list_schedule(placement, num_microbatches, limits, search_costs, comm,
                                     fill_short_gaps=fill, footprint=weights, prefer=prefer, reserve=reserve)
            except ValueError:  # these limits starve the greedy rule; try the next
                continue
            rule = f"{prefer} F/B{'' if fill else ', W only in long gaps'}{', reserving' if reserve else ''}"
            consider(_strip(plan, unsplit), f"list schedule ({rule}; limits {_show(limits)})")
            if at_bound():
                break
    if best is None:
        least = _least_limit(placement, footprint, num_ranks)
        raise ValueError(
            f"memory_limit {memory_limit!r} ({unit} per rank) leaves no plan for {num_stages} stages on "
            f"{num_ranks} ranks; this placement needs at least {_show(least)} per rank: raise the limit"
        )
    if not at_bound():
        plan = best[1]
        cost = as_cost_function(costs, split_backwards(a for row in plan for a in row))
        better, moves = improve(plan, num_stages, cost, comm, caps, footprint, budget)
        if moves:
            consider(better, f"{best[2]} + {moves} local move{'s' if moves != 1 else ''}")
    _, plan, method, peaks = best
    validate_plan(plan, num_stages, num_microbatches, num_ranks, placement)
    return Synthesis(
        plan=plan,
        makespan=simulate(plan, costs, comm=comm, num_stages=num_stages).makespan,
        peak=peaks,
        method=method,
        baseline=baseline[0] if baseline else None,
        baseline_makespan=baseline[1] if baseline else None,
        bound=bound,
    )


def _caps(memory_limit: MemoryLimit, num_ranks: int) -> list[float] | None:
    if memory_limit is None:
        return None
    if isinstance(memory_limit, Sequence):
        if len(memory_limit) != num_ranks:
            raise ValueError(
                f"memory_limit gives {len(memory_limit)} values but there are {num_ranks} ranks; "
                f"give one per rank, or one number for all"
            )
        return [float(v) for v in memory_limit]
    return [float(memory_limit)] * num_ranks


def _unsplit_stages(costs: Costs, num_stages: int) -> frozenset[int]:
    """Stages whose backward cannot be split: a mapping that prices no W there."""
    if not isinstance(costs, Mapping):
        return frozenset()
    return frozenset(s for s in range(num_stages) if ("W", s) not in costs)


def _with_free_weight_passes(costs: Costs, unsplit: frozenset[int]) -> Costs:
    """``costs`` with W = 0 on the unsplit stages: B there is the whole backward, W a no-op to strip."""
    if not unsplit:
        return costs
    table = dict(costs)  # type: ignore[arg-type]
    table.update({("W", s): 0.0 for s in unsplit})
    return table


def _strip(plan: Plan, unsplit: frozenset[int]) -> Plan:
    """Drop the W actions of ``unsplit`` stages, making those backwards whole again (same timing, less memory)."""
    if not unsplit:
        return plan
    return [[a for a in row if not (a.kind == "W" and a.stage in unsplit)] for row in plan]


def _variants(
    placement: Sequence[int],
    num_microbatches: int,
    footprint: Sequence[float],
    caps: list[float] | None,
    seeds: Sequence[tuple[str, Plan]],
    best: tuple[Any, Plan, str, list[float]] | None,
) -> list[tuple[list[float], list[float] | None, str, bool, bool]]:
    """List-scheduler settings to try: (limits, footprint, F/B rule, fill short gaps, reserve).

    First each seed's own per-rank pair counts (the orders
    :func:`~pipesched.plan.greedy.tune_order` tries, so the result is never
    worse than a built-in tuned for the same costs), then limits from the
    best plan so far up through 1.5x and 2x to everything or the cap. With
    several stages per rank each limit is also tried reserving room for a
    micro-batch's later stages (which a tight cap needs to avoid starving).
    """
    num_ranks = len(caps) if caps is not None else 1 + max(placement)
    variants: list[tuple[list[float], list[float] | None, str, bool, bool]] = []
    pairs = all(w == 1.0 for w in footprint)  # the cap counts pairs: one rule for both kinds of limits
    weights = None if pairs else list(footprint)
    for _, plan in seeds:
        limits = [max(1, peak_inflight(row)) for row in plan]
        for fill in (True, False):
            if (limits, None, "alternate", fill, False) not in variants:
                variants.append((limits, None, "alternate", fill, False))
    everything = [
        num_microbatches * sum(footprint[s] for s in range(len(placement)) if placement[s] == r)
        for r in range(num_ranks)
    ]
    least = _least_limit(placement, footprint, num_ranks)
    depth = max(best[3]) if best is not None else max(least)
    sets: list[list[float]] = []
    for factor in (1.0, 1.5, 2.0, math.inf):
        limits = [max(least[r], min(depth * factor, everything[r])) for r in range(num_ranks)]
        if caps is not None:
            limits = [min(limit, cap) for limit, cap in zip(limits, caps)]
        if limits not in sets:
            sets.append(limits)
    for limits in sets:
        if pairs:
            limits = [max(1, int(limit)) for limit in limits]
        for prefer in ("alternate", "backward"):
            if (limits, weights, prefer, True, False) not in variants:
                variants.append((limits, weights, prefer, True, False))
        if len(placement) > num_ranks:
            variants.append((limits, weights, "alternate", True, True))
    return variants


def _least_limit(placement: Sequence[int], footprint: Sequence[float], num_ranks: int) -> list[float]:
    """Per rank, what one micro-batch holds across all the rank's stages: a looped or V rank holds a
    micro-batch on its first stage while it comes back to a later one, so less cannot work."""
    return [max(sum(footprint[s] for s in range(len(placement)) if placement[s] == r), 1e-12)
            for r in range(num_ranks)]


def _show(limits: Sequence[float]) -> str:
    values = [f"{v:g}" for v in limits]
    return values[0] if len(set(values)) == 1 else "[" + ", ".join(values) + "]"

