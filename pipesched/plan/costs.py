"""What a cost is, and how costs given as a dict, a callable or measured task records become one.

Everything that prices a plan (the simulator and its lower bound, list
scheduling, the ``"auto"`` synthesis, the zero-bubble schedules' tuning)
takes ``costs`` in whichever shape its caller has at hand and needs one
thing from them: ``action -> seconds``. This module is that one conversion,
with its checks, so every consumer prices the same plan the same way and a
bad cost fails with the same error wherever it is given. The runtime's
measured records also become a per-stage cost table here
(:func:`median_costs`), telling split and whole backwards apart by the same rule.

Costs come in three shapes:

* a callable ``(kind, stage) -> seconds``, e.g. ``lambda kind, stage: 1.0 if kind == "F" else 2.0``;
* a mapping keyed by ``(kind, stage)``, e.g. ``{("F", 0): 1.0, ("B", 0): 2.0, ...}``;
* measured task records (:class:`pipesched.plan.record.TaskRecord`, or anything with
  ``kind``, ``stage``, ``microbatch``, ``start``, ``end``): each action costs its
  own measured duration; an action with no record costs the mean of its
  ``(kind, stage)``; an action recorded several times (several steps) costs the
  mean of its records.

Split backwards. Kind ``"W"`` prices a weight-gradient pass. Where the plan
splits a backward (holds ``W(s, m)``), ``("B", s)`` is the input-gradient part
alone. A backward the plan does not split runs both parts at once, so:

* a mapping that gives ``("BW", s)`` (:data:`FUSED`) prices stage s's unsplit
  backwards at that: the whole backward *as measured in one pass*, which on
  small layers is far cheaper than its split parts (one autograd pass instead
  of two; 1.76 ms against B + W = 7.19 ms on a small GPT's last stage). Without
  it, a mapping that gives ``("W", s)`` prices them at ``B + W``, and one that
  gives no W for the stage at ``B`` (the whole backward, as before W existed).
  One mapping ``{F, B, W, BW}`` therefore prices 1F1B and ZB-H1 as each will
  run, and so compares them fairly;
* a callable is asked for each action's own kind: ``("B", s)`` for an unsplit
  backward too, so it returns the whole backward there (old callables keep
  their meaning); use a mapping to get ``B + W``;
* measured records know which backwards ran split (a ``B`` record with a ``W``
  record of the same stage and micro-batch): an unsplit backward costs its own
  record, else its measured ``B + W`` parts; a split one needs split records.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

from pipesched.plan.action import Action
from pipesched.plan.record import TaskRecord

__all__ = ["FUSED", "CostFunction", "Costs", "as_cost_function", "check_comm", "median_costs", "task_overhead"]

#: The key kind of a stage's whole (unsplit, fused) backward in a cost mapping: ``("BW", s)``.
FUSED = "BW"

#: ``(kind, stage) -> seconds``.
CostFunction = Callable[[str, int], float]
#: What :func:`~pipesched.plan.simulate.simulate` and :func:`~pipesched.plan.simulate.lower_bound` accept as ``costs``.
Costs = Union[CostFunction, Mapping[tuple[str, int], float], Iterable[TaskRecord]]

_RECORD_FIELDS = ("kind", "stage", "microbatch", "start", "end")


def as_cost_function(
    costs: Costs, split: Iterable[tuple[int, int]] = ()
) -> Callable[[Action], float]:
    """Turn any accepted ``costs`` shape into ``action -> seconds``, checking every value.

    ``split`` holds the (stage, micro-batch) pairs whose backward the plan
    splits; every other B is an unsplit backward, priced as the module
    docstring says.
    """
    split = frozenset(split)
    if isinstance(costs, Mapping):
        table = costs

        def entry(kind: str, action: Action) -> Any:
            key = (kind, action.stage)
            if key not in table:
                raise ValueError(
                    f"costs has no entry for {key!r} (needed by {action}); give one per "
                    f"(kind, stage) that the plan runs, e.g. {{('F', 0): 1.0, ('B', 0): 2.0}}"
                    + ("; W is the weight-gradient pass of a split backward" if kind == "W" else "")
                )
            return table[key]

        def lookup(action: Action) -> Any:
            unsplit = action.kind == "B" and (action.stage, action.microbatch) not in split
            if unsplit and (FUSED, action.stage) in table:
                return table[(FUSED, action.stage)]
            value = entry(action.kind, action)
            if unsplit and ("W", action.stage) in table:
                return _checked_value(value, action) + _checked_value(table[("W", action.stage)], action)
            return value

        return _checked(lookup)
    if callable(costs):
        function = costs
        return _checked(lambda action: function(action.kind, action.stage))
    if isinstance(costs, (str, bytes)) or not isinstance(costs, Iterable):
        raise ValueError(
            f"costs must be a callable (kind, stage) -> seconds, a dict keyed by (kind, stage), "
            f"or measured task records; got {type(costs).__name__}"
        )
    return _checked(_measured_costs(costs, split))


def _measured_costs(records: Iterable[Any], split: frozenset[tuple[int, int]]) -> Callable[[Action], float]:
    """Per action: the mean of its own records, else the mean of its (kind, stage).

    Backwards are told apart by whether they ran split (a W record of the
    same stage and micro-batch exists): ``"B"`` for a whole backward,
    ``"B/in"`` for the input-gradient part of a split one. A plan's unsplit
    backward with only split measurements costs their ``B + W``.
    """
    rows: list[tuple[str, int, int, float]] = []
    for index, record in enumerate(records):
        missing = [f for f in _RECORD_FIELDS if not hasattr(record, f)]
        if missing:
            raise ValueError(
                f"costs[{index}] is {type(record).__name__}, which lacks {', '.join(missing)}; "
                f"measured costs must be task records (pipesched.TaskRecord)"
            )
        rows.append((record.kind, record.stage, record.microbatch, float(record.end) - float(record.start)))
    if not rows:
        raise ValueError("costs is an empty list of task records; give at least one record")
    measured_split = {(stage, mb) for kind, stage, mb, _ in rows if kind == "W"}
    own: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    by_stage: dict[tuple[str, int], list[float]] = defaultdict(list)
    for kind, stage, mb, duration in rows:
        if kind == "B" and (stage, mb) in measured_split:
            kind = "B/in"
        own[(kind, stage, mb)].append(duration)
        by_stage[(kind, stage)].append(duration)
    own_mean = {key: math.fsum(v) / len(v) for key, v in own.items()}
    stage_mean = {key: math.fsum(v) / len(v) for key, v in by_stage.items()}

    def sum_of(table: Mapping[Any, float], *keys: Any) -> float | None:
        values = [table.get(key) for key in keys]
        return None if any(v is None for v in values) else math.fsum(values)  # type: ignore[arg-type]

    def cost(action: Action) -> float:
        s, m = action.stage, action.microbatch
        if action.kind != "B":
            value = own_mean.get((action.kind, s, m))
            if value is None:
                value = stage_mean.get((action.kind, s))
        elif (s, m) in split:
            value = own_mean.get(("B/in", s, m))
            if value is None:
                value = stage_mean.get(("B/in", s))
            if value is None and ("B", s) in stage_mean:
                raise ValueError(
                    f"{action} is the input-gradient part of a split backward, but the records "
                    f"only hold whole backwards of stage {s} (no W was measured); record a run "
                    f"of a schedule that splits stage {s}'s backwards"
                )
        else:  # unsplit: a whole backward's record, else its measured parts
            value = own_mean.get(("B", s, m))
            if value is None:
                value = sum_of(own_mean, ("B/in", s, m), ("W", s, m))
            if value is None:
                value = stage_mean.get(("B", s))
            if value is None:
                value = sum_of(stage_mean, ("B/in", s), ("W", s))
        if value is None:
            raise ValueError(
                f"no task record for {action} nor any other {action.kind} of stage "
                f"{action.stage}; the records must cover every (kind, stage) the plan runs"
            )
        return value

    return cost


def _checked(cost: Callable[[Action], Any]) -> Callable[[Action], float]:
    def checked(action: Action) -> float:
        return _checked_value(cost(action), action)

    return checked


def _checked_value(raw: Any, action: Action) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"costs gave {raw!r} seconds for {action}; every cost must be a finite number >= 0")
    return value


def check_comm(comm: float) -> float:
    """``comm`` (seconds added on every cross-rank edge) as a float, or a ValueError naming it."""
    try:
        value = float(comm)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(comm, bool) or not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"comm must be a finite number of seconds >= 0, got {comm!r}")
    return value


def median_costs(records: Iterable[Any]) -> dict[tuple[str, int], float]:
    """``{(kind, stage): median seconds}`` over ``records`` (anything with kind, stage, microbatch, start, end).

    A schedule built for the model's costs (``wants_costs``) is handed these after
    every step. The median, not the mean: a step's first tasks pay for warm-up
    (allocations, lazy initialisation, a thread waking up), and one slow task
    should not make a stage look slow.

    Backwards are told apart as the simulator tells them apart: a ``B`` record
    with a ``W`` record of the same stage and micro-batch is the input-gradient
    part of a split backward, and ``("B", s)`` is the median of those; a stage
    whose backwards all ran whole gets ``("B", s)`` = the whole backward and no
    ``("W", s)``, which a cost table reads as "this stage's backward is not split".
    A stage measured both ways (``"auto"``'s warm-up splits every other
    micro-batch) also gets ``("BW", s)``: its whole backwards, which is what an
    unsplit backward is priced at from then on.

    Every figure includes the engine's own cost of a task (:func:`task_overhead`),
    so that a plan with more tasks (every split backward adds a W) pays for them.
    """
    records = list(records)
    rows = [(r.kind, r.stage, r.microbatch, float(r.end) - float(r.start)) for r in records]
    split = {(stage, mb) for kind, stage, mb, _ in rows if kind == "W"}
    split_stages = {stage for stage, _ in split}
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    for kind, stage, mb, seconds in rows:
        if kind == "B" and stage in split_stages and (stage, mb) not in split:
            kind = FUSED  # a whole backward of a stage measured split too
        durations[(kind, stage)].append(seconds)
    overhead = task_overhead(records)
    return {key: statistics.median(values) + overhead for key, values in sorted(durations.items())}


def task_overhead(records: Iterable[Any]) -> float:
    """The engine's seconds between one task and the next when nothing is waited for (median), else 0.

    A W that directly follows its own B on the same rank waits for nothing
    (its only dependency is that B), so the gap between them is what the engine
    spends per task (dispatch, recording, the readiness signals) and no
    bubble. Records without such a pair (no split backward) give 0: nothing
    tells overhead from waiting there.
    """
    by_rank: dict[int, list[Any]] = defaultdict(list)
    for record in records:
        by_rank[getattr(record, "rank", 0)].append(record)
    gaps = []
    for row in by_rank.values():
        row.sort(key=lambda r: (float(r.start), float(r.end)))
        for before, after in zip(row, row[1:]):
            if (before.kind, after.kind) == ("B", "W") and (before.stage, before.microbatch) == \
                    (after.stage, after.microbatch):
                gap = float(after.start) - float(before.end)
                if gap >= 0.0:
                    gaps.append(gap)
    return statistics.median(gaps) if gaps else 0.0
