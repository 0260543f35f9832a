"""A schedule's plan as a text chart on a time grid, and the simulator's verdict on it.

``pipesched schedule show`` prints this: one row per rank, one column per time
quantum, each action drawn where the simulator starts it, so the bubble is
visible as dots::

    time    0    1    2    3    4    5
    rank 0  F0.0 F0.1 .    .    B0.1 B0.0
    rank 1  .    F1.0 F1.1 B1.1 B1.0 .

An action longer than one quantum continues with ``-`` marks; a split
backward's weight-gradient pass shows as ``W2.3``. The quantum is the greatest
common divisor of the costs (forward, backward, weight, comm), so every
start and end falls on a column boundary; when that would need more than
:data:`MAX_COLUMNS` columns the grid coarsens to the smallest cost and times
are rounded to it (the chart says so).

Pure Python over :mod:`pipesched.plan.simulate`; it imports no torch, so it is as
cheap as the simulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from pipesched.plan.action import Action, Plan
from pipesched.plan.registry import get_schedule
from pipesched.plan.schedule import Schedule, validate_placement, validate_plan
from pipesched.plan.simulate import LowerBound, SimResult, lower_bound, simulate

__all__ = ["MAX_COLUMNS", "PlanChart", "PlanError", "build_chart", "default_ranks", "format_chart", "format_summary"]

#: Above this many time columns the chart rounds times to the smallest cost.
MAX_COLUMNS = 400

IDLE = "."
CONTINUED = "-"


class PlanError(ValueError):
    """The schedule refuses the requested shape, or its plan fails validation (the user's to fix)."""


@dataclass(frozen=True)
class PlanChart:
    """A validated plan with its simulation, ready to print."""

    schedule: str
    num_stages: int
    num_microbatches: int
    num_ranks: int
    forward_cost: float
    backward_cost: float
    comm: float
    plan: Plan
    #: cost of a W; ``None`` when the plan splits no backward and none was given
    weight_cost: float | None
    sim: SimResult
    bound: LowerBound


def default_ranks(schedule: Schedule, num_stages: int) -> int | None:
    """The rank count the schedule itself would pick for ``num_stages`` stages.

    Same rule as ``Pipeline`` without devices: the smallest ``R`` whose
    ``schedule.default_num_stages(R)`` is ``num_stages`` (``R = S`` for GPipe
    and 1F1B, ``R = S / 2`` for interleaved 1F1B). ``None`` when no ``R`` fits,
    so the caller can ask for ``--ranks`` instead of guessing.
    """
    return next((r for r in range(1, num_stages + 1) if schedule.default_num_stages(r) == num_stages), None)


def build_chart(
    name: str,
    num_stages: int,
    num_microbatches: int,
    num_ranks: int | None = None,
    forward_cost: float = 1.0,
    backward_cost: float = 1.0,
    comm: float = 0.0,
    weight_cost: float | None = None,
) -> PlanChart:
    """Plan ``name`` for the shape, validate it exactly as the engine would, and simulate it.

    ``weight_cost`` prices W actions; when given, ``backward_cost`` is the
    input-gradient part of a backward and a backward the plan does not split
    costs ``backward_cost + weight_cost`` (the simulator's rule). Left out, a
    plan that splits backwards gets ``weight_cost = backward_cost`` (F = B = W,
    the zero-bubble papers' setting), and one that does not keeps
    ``backward_cost`` as its whole backward.

    Raises :class:`PlanError` (with the schedule's own advice) for an unknown
    name, a shape the schedule refuses, or a plan that fails validation. Only
    those calls are guarded, so a bug in the simulator still shows its traceback.
    """
    try:
        schedule = get_schedule(name)
        if num_ranks is None:
            num_ranks = default_ranks(schedule, num_stages)
            if num_ranks is None:
                raise PlanError(
                    f"schedule {schedule.name!r} has no natural rank count for {num_stages} stages; "
                    f"pass --ranks"
                )
        placement = validate_placement(schedule.placement(num_stages, num_ranks), num_stages, num_ranks)
        if schedule.wants_costs:  # a schedule built for the costs (auto): these are the ones charted
            priced = {(kind, s): cost for s in range(num_stages) for kind, cost in (
                ("F", forward_cost), ("B", backward_cost),
                ("W", backward_cost if weight_cost is None else weight_cost))}
            schedule.use_costs(priced, comm)
        raw = schedule.plan(num_stages, num_microbatches, num_ranks)
        plan = validate_plan(raw, num_stages, num_microbatches, num_ranks, placement)
    except PlanError:
        raise
    except ValueError as error:
        raise PlanError(str(error)) from error
    if weight_cost is None and any(a.kind == "W" for row in plan for a in row):
        weight_cost = backward_cost
    costs = {("F", s): forward_cost for s in range(num_stages)}
    costs.update({("B", s): backward_cost for s in range(num_stages)})
    if weight_cost is not None:
        costs.update({("W", s): weight_cost for s in range(num_stages)})
    return PlanChart(
        schedule=schedule.name,
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        num_ranks=num_ranks,
        forward_cost=forward_cost,
        backward_cost=backward_cost,
        comm=comm,
        plan=plan,
        weight_cost=weight_cost,
        sim=simulate(plan, costs, comm=comm, num_stages=num_stages),
        bound=lower_bound(plan, costs, comm=comm, num_stages=num_stages),
    )


def _quantum(chart: PlanChart) -> tuple[float, bool]:
    """Column width in time units, and whether times had to be rounded to it.

    The exact choice is the gcd of the costs (as fractions): every simulated
    time is a sum of costs, hence a whole number of quanta.
    """
    positive = [c for c in (chart.forward_cost, chart.backward_cost, chart.weight_cost or 0.0, chart.comm) if c > 0]
    if not positive:
        return 1.0, False
    fractions = [Fraction(c).limit_denominator(10_000) for c in positive]
    exact = all(abs(float(f) - c) <= 1e-12 * max(1.0, c) for f, c in zip(fractions, positive))
    if exact:
        denominator = math.lcm(*(f.denominator for f in fractions))
        numerator = math.gcd(*(int(f * denominator) for f in fractions))
        quantum = numerator / denominator
        if chart.sim.makespan / quantum <= MAX_COLUMNS:
            return quantum, False
    return min(positive), True


def format_chart(chart: PlanChart) -> str:
    """The time-grid chart: a time header, then one row per rank."""
    quantum, rounded = _quantum(chart)
    columns = max(1, round(chart.sim.makespan / quantum))
    actions = [a for row in chart.plan for a in row]
    width = max([len(str(a)) for a in actions] + [len(IDLE)])
    grid = [[IDLE] * columns for _ in range(chart.num_ranks)]
    for action in actions:
        _place(grid[chart.sim.rank_of[action]], action, chart, quantum)

    label_width = len(f"rank {chart.num_ranks - 1}")
    header = ["time".ljust(label_width)] + [_time_label(c * quantum, width) for c in range(columns)]
    lines = ["  ".join([header[0], " ".join(header[1:])]).rstrip()]
    for rank, cells in enumerate(grid):
        row = " ".join(cell.ljust(width) for cell in cells)
        lines.append(f"{f'rank {rank}'.ljust(label_width)}  {row}".rstrip())
    note = f"one column = {quantum:g} time unit{'' if quantum == 1 else 's'}"
    if rounded:
        note += " (times rounded to the nearest column; costs share no small common unit)"
    return "\n".join(lines + [note])


def _place(cells: list[str], action: Action, chart: PlanChart, quantum: float) -> None:
    """Write ``action`` into its rank's cells: its name, then continuation marks."""
    first = round(chart.sim.start[action] / quantum)
    last = max(first + 1, round(chart.sim.end[action] / quantum))
    for column in range(first, min(last, len(cells))):
        cells[column] = str(action) if column == first else CONTINUED


def _time_label(time: float, width: int) -> str:
    """The column's start time when it fits in the cell, else blank."""
    text = f"{time:g}"
    return text.ljust(width) if len(text) <= width else " " * width


def format_summary(chart: PlanChart) -> str:
    """Makespan, both bubble conventions, lower bound, and a per-rank table."""
    sim, bound = chart.sim, chart.bound
    weight = "" if chart.weight_cost is None else f" W={chart.weight_cost:g}"
    lines = [
        (f"schedule {chart.schedule}: {chart.num_stages} stages on {chart.num_ranks} ranks, "
         f"{chart.num_microbatches} micro-batches; costs F={chart.forward_cost:g} "
         f"B={chart.backward_cost:g}{weight} comm={chart.comm:g} (time units)"),
        f"simulated makespan    {sim.makespan:g}",
        (f"bubble                {_percent(sim.overall_bubble_over_total)} of total "
         f"(idle / (ranks x makespan)), {_percent(sim.overall_bubble_over_ideal)} of ideal (idle / busy)"),
        (f"lower bound           {bound.value:g}  (busiest rank's work {bound.work:g}, "
         f"longest micro-batch chain {bound.chain:g})"),
        f"efficiency            {_percent(bound.efficiency(sim.makespan))}  (lower bound / makespan)",
        "",
    ]
    columns = ["rank", "busy", "idle", "bubble/total", "bubble/ideal", "peak in-flight"]
    rows = [
        [
            str(rank),
            f"{sim.busy[rank]:g}",
            f"{sim.idle[rank]:g}",
            _percent(sim.bubble_over_total[rank]),
            _percent(sim.bubble_over_ideal[rank]),
            str(sim.peak_inflight[rank]),
        ]
        for rank in range(chart.num_ranks)
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "inf" if math.isinf(value) else f"{100.0 * value:.1f} %"
