"""Run a plan on a cost model instead of a device: makespan, bubble, memory, critical path.

A schedule is a bet on how work overlaps. The simulator prices that bet before
anything runs (``pipesched schedule show``), and after a run it replays the same
plan on the *measured* task durations, which separates what the schedule leaves
idle from what the runtime adds on top (see :mod:`pipesched.observe.timeline`).

The dependency model is :func:`pipesched.plan.replay.replay`'s, the one of the
code base. :func:`simulate` runs it on numpy columns
(:mod:`pipesched.plan.fast_simulate`), which answers exactly what the reference,
:func:`simulate_reference` (a walk through dicts, about 25 µs an action), answers,
in a few passes over the plan: plans of millions of actions simulate in seconds.
Where the plan or the costs are at fault the reference runs and names the
problem.

Costs come as a callable ``(kind, stage) -> seconds``, a mapping keyed by
``(kind, stage)`` or measured task records; :mod:`pipesched.plan.costs` says
what each means, also how split and unsplit backwards are priced.

Two bubble conventions are in use and they differ by a lot, so both are given
and named for their denominator: ``bubble_over_total`` is idle / makespan (the
share of the wall clock a rank waits), ``bubble_over_ideal`` is idle / busy (the
GPipe and Megatron-LM papers' convention: ``(p - 1) / m`` for GPipe under uniform
costs, the overhead relative to the ideal, bubble-free time).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pipesched.plan.action import Action, Plan, split_backwards
from pipesched.plan.costs import CostFunction, Costs, as_cost_function, check_comm
from pipesched.plan.lowering import SkipEdge, check_skips, dependencies, inputs_of
from pipesched.plan.replay import replay
from pipesched.plan.sim_result import SimResult

# CostFunction, Costs and as_cost_function were declared here before pipesched.plan.costs
# existed (schedule plug-ins import Costs from here): they stay importable from this module.
__all__ = [
    "CostFunction",
    "Costs",
    "IncompletePlan",
    "LowerBound",
    "SimResult",
    "as_cost_function",
    "lower_bound",
    "peak_inflight",
    "simulate",
    "simulate_reference",
]


class IncompletePlan(ValueError):
    """A plan holding an action whose input is made by no action of the plan.

    The simulator cannot price such a plan (when would the input arrive?). It
    happens for hand-written plans with a hole, and for half a step, such as
    the backward-only half that ``output.backward()`` runs after ``pipe(x)``.
    """


@dataclass(frozen=True)
class LowerBound:
    """Two bounds no run of the plan can beat, for the same costs; ``value`` is the larger.

    * ``work``: the busiest rank's total work (``work_rank``), since a rank runs
      one action at a time.
    * ``chain``: the longest single micro-batch chain (``chain_microbatch``),
      ``F(0) .. F(S-1), B(S-1) .. B(0)`` plus ``comm`` for every hop between ranks,
      since each link waits for the one before; with split backwards, the
      longest path through the micro-batch's actions (a W hangs off its B).

    ``bound.efficiency(makespan)`` is ``value / makespan``: 1.0 means the plan
    is as fast as these two limits allow.
    """

    work: float
    chain: float
    work_rank: int | None = None
    chain_microbatch: int | None = None

    @property
    def value(self) -> float:
        """``max(work, chain)``."""
        return max(self.work, self.chain)

    def __float__(self) -> float:
        return self.value

    def efficiency(self, makespan: float) -> float:
        """``value / makespan`` (1.0 for an empty plan, where both are 0)."""
        if makespan <= 0.0:
            return 1.0
        return self.value / makespan


def simulate(
    plan: Sequence[Sequence[Action]],
    costs: Costs,
    comm: float = 0.0,
    num_stages: int | None = None,
    skips: Sequence[SkipEdge] = (),
) -> SimResult:
    """Replay ``plan`` (one action list per rank) with ``costs``; summarise the run.

    Args:
        plan: per-rank action lists, as ``Schedule.plan`` returns. Every action's
            inputs must be produced by some action of the plan.
        costs: a callable ``(kind, stage) -> seconds``, a mapping keyed by
            ``(kind, stage)``, or measured task records (see :mod:`pipesched.plan.costs`,
            also for how split and unsplit backwards are priced).
        comm: seconds added to every dependency whose two ends are on different ranks.
        num_stages: the model's stage count; default ``1 + `` the largest stage in
            ``plan``. Only matters for a plan that leaves out the last stages.
        skips: the model's skip connections
            (:class:`~pipesched.plan.lowering.SkipEdge`): their transfers go straight
            from the stashing stage's rank to the popping stage's, ``comm`` each.

    Raises:
        ValueError: a malformed plan, a bad cost, or :class:`IncompletePlan`;
            :class:`pipesched.Deadlock` (a ``ValueError``) when the plan deadlocks.

    A mapping or a callable is read once per ``(kind, stage)`` (and split or
    whole backward), as its contract allows; measured records per action.
    """
    if not isinstance(costs, Mapping) and not callable(costs) and isinstance(costs, Iterable) \
            and not isinstance(costs, (str, bytes)):
        costs = list(costs)  # records may come as a generator: read them once, for either path
    from pipesched.plan.fast_simulate import simulate_fast  # numpy loads with the first simulation
    from pipesched.plan.plan_arrays import NotFast

    try:
        return simulate_fast(plan, costs, comm, num_stages, skips)
    except NotFast:  # the plan or the costs are at fault: the reference says how
        return simulate_reference(plan, costs, comm, num_stages, skips)


def simulate_reference(
    plan: Sequence[Sequence[Action]],
    costs: Costs,
    comm: float = 0.0,
    num_stages: int | None = None,
    skips: Sequence[SkipEdge] = (),
) -> SimResult:
    """:func:`simulate` through :func:`~pipesched.plan.replay.replay`, action by action through dicts.

    The yardstick the array-based simulator (:mod:`pipesched.plan.fast_simulate`)
    is tested against, and what names the problem when a plan or its costs
    are at fault. About 25 µs an action.
    """
    rows, num_stages = _check_plan(plan, num_stages)
    skips = check_skips(skips, num_stages)
    comm = check_comm(comm)
    cost = as_cost_function(costs, split_backwards(a for row in rows for a in row))
    result = replay(rows, num_stages, cost, comm, skips)
    makespan = result.makespan

    return SimResult.summarise(
        makespan=makespan,
        busy=[math.fsum(result.end[a] - result.start[a] for a in row) for row in rows],
        peak_inflight=[peak_inflight(row) for row in rows],
        critical_path=_critical_path(rows, result.end, result.critical),
        start=result.start,
        end=result.end,
        rank_of=result.rank_of,
        num_stages=num_stages,
    )


def lower_bound(
    plan: Sequence[Sequence[Action]],
    costs: Costs,
    comm: float = 0.0,
    num_stages: int | None = None,
) -> LowerBound:
    """The work bound and the chain bound of ``plan`` under ``costs``.

    Same arguments as :func:`simulate`, so ``lower_bound(plan, costs).efficiency(
    simulate(plan, costs).makespan)`` says how close the plan comes to the best
    any order of the same work on the same ranks could do. The plan supplies the
    placement (which rank runs which stage), not the order.
    """
    rows, num_stages = _check_plan(plan, num_stages)
    comm = check_comm(comm)
    cost = as_cost_function(costs, split_backwards(a for row in rows for a in row))

    work, work_rank = 0.0, None
    for rank, row in enumerate(rows):
        total = math.fsum(cost(a) for a in row)
        if work_rank is None or total > work:
            work, work_rank = total, rank

    rank_of = {a: rank for rank, row in enumerate(rows) for a in row}
    chains: dict[int, list[Action]] = defaultdict(list)
    for row in rows:
        for action in row:
            chains[action.microbatch].append(action)
    chain, chain_mb = 0.0, None
    for mb in sorted(chains):
        length = _longest_path(chains[mb], num_stages, cost, comm, rank_of)
        if chain_mb is None or length > chain:
            chain, chain_mb = length, mb
    return LowerBound(work=work, chain=chain, work_rank=work_rank, chain_microbatch=chain_mb)


def _longest_path(
    actions: list[Action], num_stages: int, cost: Callable[[Action], float], comm: float,
    rank_of: Mapping[Action, int],
) -> float:
    """Longest path through one micro-batch's actions along the dependency rule.

    Every edge of the rule stays within a micro-batch, so this is the chain no
    order can shorten: F up the stages, B down, each W after its B, plus
    ``comm`` on each edge between ranks.
    """
    finish: dict[Action, float] = {}
    # F by stage upwards, then B by stage downwards, W last: every producer before its consumer.
    phase = {"F": 0, "B": 1, "W": 2}
    for action in sorted(actions, key=lambda a: (phase[a.kind], a.stage if a.kind == "F" else -a.stage)):
        begin = 0.0
        for edge in inputs_of(action, num_stages):
            if edge.producer in finish:
                hop = comm if rank_of[edge.producer] != rank_of[action] else 0.0
                begin = max(begin, finish[edge.producer] + hop)
        finish[action] = begin + cost(action)
    return max(finish.values(), default=0.0)


def peak_inflight(actions: Iterable[Action]) -> int:
    """Most (stage, micro-batch) pairs forwarded and not yet done with along ``actions``.

    ``actions`` is one rank's list in the order it runs them; a rank runs one
    action at a time, so order alone decides the peak. A pair is done with at
    its B, or, when the list also holds its W (a split backward), at its W:
    the weight-gradient pass still needs the saved activations.
    """
    row = list(actions)
    split = split_backwards(row)
    inflight = peak = 0
    for action in row:
        if action.kind == "F":
            inflight += 1
        elif action.kind == "W" or (action.stage, action.microbatch) not in split:
            inflight -= 1
        peak = max(peak, inflight)
    return peak


def _check_plan(plan: Sequence[Sequence[Action]], num_stages: int | None) -> tuple[Plan, int]:
    """Shape checks only: the dependency graph itself is replay's business."""
    if isinstance(plan, (str, bytes)) or not isinstance(plan, Sequence):
        raise ValueError(f"plan must be a list of per-rank action lists, got {type(plan).__name__}")
    rows: Plan = []
    seen: dict[Action, int] = {}
    for rank, actions in enumerate(plan):
        if isinstance(actions, (str, bytes)) or not isinstance(actions, Iterable):
            raise ValueError(f"plan[{rank}] must be a list of Action, got {actions!r}")
        row = list(actions)
        for action in row:
            if not isinstance(action, Action):
                raise ValueError(f"plan[{rank}] holds {action!r}; expected Action(kind, stage, microbatch)")
            if action in seen:
                raise ValueError(f"{action} appears twice in the plan (ranks {seen[action]} and {rank})")
            seen[action] = rank
        rows.append(row)
    top = 1 + max((a.stage for a in seen), default=-1)
    if num_stages is None:
        num_stages = top
    elif isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < top:
        raise ValueError(
            f"num_stages must be an int covering every stage of the plan (>= {top}), got {num_stages!r}; "
            f"or leave it out"
        )
    for action, rank in seen.items():
        for dep in dependencies(action, num_stages):
            if dep not in seen:
                raise IncompletePlan(
                    f"{action} on rank {rank} needs {dep}, which no rank of the plan runs; "
                    f"a plan must hold the inputs of every action it holds"
                )
    return rows, num_stages


def _critical_path(
    rows: Plan, end: Mapping[Action, float], critical: Mapping[Action, Action | None]
) -> list[Action]:
    order = [a for row in rows for a in row]
    if not order:
        return []
    last = max(order, key=end.__getitem__)  # the first to end last, in plan order
    path: list[Action] = []
    node: Action | None = last
    while node is not None:
        path.append(node)
        node = critical[node]
    path.reverse()
    return path
