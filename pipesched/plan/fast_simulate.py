"""The simulator and the plan validator on arrays: what :func:`~pipesched.plan.simulate.simulate` and
:func:`~pipesched.plan.schedule.validate_plan` run by default.

Both answer exactly what the reference code answers (the dict-based walk of
:func:`pipesched.plan.replay.replay`, kept as the yardstick the tests hold
this module to): the same start and end of every action, bit for bit, the
same makespan, busy times, peaks and critical path, the same verdict on a
plan, the same :class:`~pipesched.plan.replay.Deadlock`. They get there in a
few passes over numpy columns (:mod:`pipesched.plan.plan_arrays`,
:mod:`pipesched.plan.fast_replay`) instead of one dict operation after
another, which is what makes a plan of 256 ranks and 4096 micro-batches
(two million actions) a matter of seconds, not minutes.

Wherever the answer is an error (a malformed plan, a bad cost, a missing
input), these functions raise :class:`~pipesched.plan.plan_arrays.NotFast`
and the caller runs the reference, which names the problem exactly as it
always did. Costs given as a mapping or a callable are read once per
``(kind, stage)`` (and split or whole backward), as their contract
``(kind, stage) -> seconds`` allows; measured records, whose cost depends on
the micro-batch, are read per action.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipesched.plan.action import KINDS, Action, Plan
from pipesched.plan.costs import Costs, as_cost_function, check_comm
from pipesched.plan.fast_replay import replay_arrays
from pipesched.plan.lowering import Skips, SkipEdge, check_skips
from pipesched.plan.plan_arrays import ActionTable, NotFast, PlanArrays
from pipesched.plan.sim_result import SimResult

__all__ = ["CheckedPlan", "action_durations", "simulate_fast", "validate_plan_fast"]

_F, _B, _W = 0, 1, 2


def simulate_fast(
    plan: Sequence[Sequence[Action]],
    costs: Costs,
    comm: float = 0.0,
    num_stages: int | None = None,
    skips: Sequence[SkipEdge] = (),
    engine: str | None = None,
) -> SimResult:
    """:func:`pipesched.plan.simulate.simulate` on arrays; :class:`NotFast` where it would raise (but a deadlock)."""
    arrays = _arrays_of(plan, 0 if num_stages is None else _stage_count(num_stages))
    if num_stages is None:
        num_stages = arrays.num_stages
    if arrays.num_stages != num_stages:  # a stage beyond num_stages: the reference names it
        raise NotFast
    deps, wanted = arrays.dependencies()
    if (wanted & (deps < 0)).any():
        raise NotFast  # IncompletePlan
    checked_skips = check_skips(skips, num_stages)
    comm = check_comm(comm)
    if checked_skips:
        deps, wanted = arrays.dependencies(checked_skips)
        if (wanted & (deps < 0)).any():
            raise NotFast  # a skip's producer is missing
    duration = action_durations(arrays, costs)
    timed = replay_arrays(arrays, deps, duration, comm, checked_skips, engine)
    assert timed is not None
    start, end = timed.start, timed.end
    makespan = float(end.max()) if arrays.size else 0.0
    spent = (end - start).tolist()
    return SimResult.summarise(
        makespan=makespan,
        busy=[math.fsum(spent[o:o + n]) for o, n in zip(arrays.offsets.tolist(), arrays.lengths.tolist())],
        peak_inflight=_peaks(arrays),
        critical_path=_critical_path(arrays, end, timed.because),
        start=ActionTable(arrays, start),
        end=ActionTable(arrays, end),
        rank_of=ActionTable(arrays, arrays.rank),
        num_stages=num_stages,
    )


def validate_plan_fast(
    plan: Sequence[Sequence[Action]],
    num_stages: int,
    num_microbatches: int,
    placement: Sequence[int],
    kinds: str,
    skips: Skips,
) -> Plan:
    """The per-action checks of :func:`~pipesched.plan.schedule.validate_plan`, on columns.

    The caller has checked the arguments (placement, kinds, skips, one list
    per rank). Any failed check raises :class:`NotFast` (the reference then
    names the first offending action); a deadlock raises
    :class:`~pipesched.plan.replay.Deadlock` here, with the reference's words.
    """
    arrays = _arrays_of(plan, num_stages, num_microbatches)
    if arrays.num_stages != num_stages or arrays.num_microbatches != num_microbatches:
        raise NotFast  # out of range
    codes = {"FBW".index(k) for k in kinds}
    present = np.bincount(arrays.kind, minlength=3)
    if any(present[code] and code not in codes for code in range(3)):
        raise NotFast  # a kind the plan may not hold
    if arrays.size and not np.array_equal(np.asarray(placement, dtype=np.int64)[arrays.stage], arrays.rank):
        raise NotFast  # an action off its stage's rank
    position = np.arange(arrays.size)
    for kind, before in ((_B, _F), (_W, _B)):
        mine = arrays.kind == kind
        if mine.any():
            earlier = arrays.partner(before)[mine]
            if ((earlier < 0) | (earlier > position[mine])).any():
                raise NotFast  # a B before its F, a W before its B (same rank: placement holds)
    required = [code for code in (_F, _B) if code in codes]
    if any(present[code] != num_stages * num_microbatches for code in required):
        raise NotFast  # actions missing
    deps, _ = arrays.dependencies(skips)
    replay_arrays(arrays, deps, None, 0.0, skips)
    checked = CheckedPlan(list(row) for row in plan)
    checked.arrays = arrays
    return checked


class CheckedPlan(list):  # type: ignore[type-arg]
    """A plan :func:`validate_plan_fast` passed: a plain list of per-rank lists that keeps its arrays.

    Simulating a plan right after checking it is the common case (``auto``,
    ``pipesched schedule show``), so :func:`simulate_fast` reuses the arrays
    when the plan still holds the very same action objects, rank by rank
    (:meth:`PlanArrays.describes`); an edited plan is read again. Pickles and
    copies as a plain list.
    """

    __slots__ = ("arrays",)

    def __reduce__(self) -> tuple[Any, tuple[list[Any]]]:
        return (list, (list(self),))


def _arrays_of(plan: Sequence[Sequence[Action]], num_stages: int, num_microbatches: int | None = None) -> PlanArrays:
    """The arrays a :class:`CheckedPlan` keeps, when they still describe it and its shape; else new ones."""
    kept = getattr(plan, "arrays", None) if isinstance(plan, CheckedPlan) else None
    if kept is not None and kept.num_stages >= num_stages and kept.num_microbatches >= (num_microbatches or 0) \
            and kept.describes(plan):
        return kept
    return PlanArrays(plan, num_stages, num_microbatches)


def _stage_count(num_stages: Any) -> int:
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 0:
        raise NotFast
    return num_stages


def action_durations(arrays: PlanArrays, costs: Costs) -> np.ndarray:
    """Seconds per action (flat order), priced by :func:`~pipesched.plan.costs.as_cost_function` itself.

    A mapping or a callable prices by ``(kind, stage)`` and whether a B is
    split, so each such class present is priced once, through an action of
    that class, and the price spread over the class; records (a price per
    micro-batch) are asked per action.
    """
    split_b = (arrays.kind == _B) & (arrays.partner(_W) >= 0)
    try:
        if isinstance(costs, Mapping) or callable(costs):
            group = (arrays.kind * arrays.num_stages + arrays.stage) * 2 + split_b
            present = np.flatnonzero(np.bincount(group, minlength=6 * arrays.num_stages))
            kind, rest = np.divmod(present, 2 * arrays.num_stages)
            stage, split = np.divmod(rest, 2)
            # one action per class: micro-batch 1 stands for the split backwards of its stage, 0 for the rest
            classes = [Action(KINDS[k], s, b) for k, s, b in zip(kind.tolist(), stage.tolist(), split.tolist())]
            cost = as_cost_function(costs, {(a.stage, 1) for a in classes if a.microbatch})
            prices = np.zeros(6 * arrays.num_stages)
            prices[present] = [cost(a) for a in classes]
            return prices[group]
        pairs = _split_pairs(arrays.actions, split_b.tolist())
        cost = as_cost_function(costs, pairs)
        return np.fromiter(map(cost, arrays.actions), dtype=np.float64, count=arrays.size)
    except Exception as error:  # noqa: BLE001 - the reference raises it again, in its own order
        raise NotFast from error


def _split_pairs(actions: Sequence[Action], split: Sequence[bool]) -> set[tuple[int, int]]:
    return {(a.stage, a.microbatch) for a, is_split in zip(actions, split) if is_split}


def _peaks(arrays: PlanArrays) -> list[int]:
    """:func:`~pipesched.plan.simulate.peak_inflight` of every rank: a running sum per rank, its maximum."""
    if not arrays.size:
        return [0] * arrays.num_ranks
    w_at = arrays.partner(_W)
    split_here = (w_at >= 0) & (arrays.rank[np.maximum(w_at, 0)] == arrays.rank)
    delta = np.where(arrays.kind == _F, 1, np.where((arrays.kind == _W) | ~split_here, -1, 0))
    running = np.cumsum(delta)
    first = np.minimum(arrays.offsets, arrays.size - 1)  # an empty rank's offset may be past the end
    base = np.repeat(running[first] - delta[first], arrays.lengths)
    held = running - base
    peaks = np.zeros(arrays.num_ranks, dtype=np.int64)
    filled = arrays.lengths > 0
    peaks[filled] = np.maximum.reduceat(held, arrays.offsets[filled])
    return np.maximum(peaks, 0).tolist()


def _critical_path(arrays: PlanArrays, end: np.ndarray, because: np.ndarray) -> list[Action]:
    """Back from the first action (plan order) to end last, along what decided each start."""
    if not arrays.size:
        return []
    path = []
    node = int(end.argmax())
    while node >= 0:
        path.append(arrays.actions[node])
        node = int(because[node])
    path.reverse()
    return path
