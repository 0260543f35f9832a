"""The plug-in contract: what a schedule is, and how any plan is checked before it runs.

A schedule answers two questions and touches no tensor:

* ``placement(num_stages, num_ranks)``: which rank owns each stage;
* ``plan(num_stages, num_microbatches, num_ranks)``: for each rank, the order of
  its :class:`~pipesched.plan.action.Action` values.

Communication is not in the plan: an action whose input was made on another
rank implies a transfer, which the engine derives. Schedules in ``schedules/``
import this module and nothing else of pipesched.

:func:`validate_plan` runs on every plan before a single task starts, so a
broken plug-in is refused with a ``ValueError`` instead of hanging a job.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipesched.plan.action import Action, Plan
from pipesched.plan.replay import Deadlock, replay

__all__ = [
    "Action",
    "Deadlock",
    "Plan",
    "PlanCache",
    "Schedule",
    "one_forward_one_backward",
    "require_one_stage_per_rank",
    "validate_placement",
    "validate_plan",
]


class Schedule:
    """Base class of every schedule; subclass it and override :meth:`plan`.

    Override :meth:`placement` when stages do not map to ranks round-robin, and
    :meth:`default_num_stages` when the schedule wants more stages than ranks
    (``Pipeline`` uses it when the caller gives no ``balance``). A shape the
    schedule cannot run must raise ``ValueError`` saying what to change.
    """

    #: Registry name; set by subclasses for readable errors and reports.
    name: str = "custom"

    def placement(self, num_stages: int, num_ranks: int) -> list[int]:
        """Rank of each stage. Default: stage ``s`` on rank ``s % num_ranks``."""
        return [stage % num_ranks for stage in range(num_stages)]

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        """Per rank, the ordered actions it runs (every F and B exactly once)."""
        raise NotImplementedError(f"{type(self).__name__} must implement plan()")

    def default_num_stages(self, num_ranks: int) -> int:
        """How many stages to cut the model into for ``num_ranks`` ranks."""
        return num_ranks

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def require_one_stage_per_rank(name: str, num_stages: int, num_ranks: int) -> None:
    """Raise the standard error of schedules that need exactly one stage per rank."""
    if num_stages != num_ranks:
        raise ValueError(
            f"schedule {name!r} runs exactly one stage per rank, got {num_stages} stages "
            f"for {num_ranks} ranks: give as many devices as balance entries, or use "
            f"'interleaved-1f1b' for several stages per rank"
        )


def one_forward_one_backward(
    forwards: Sequence[Action], backwards: Sequence[Action], warmup: int
) -> list[Action]:
    """Interleave equal-length F and B orders: ``warmup`` Fs, then F/B pairs, then the rest.

    The shape shared by 1F1B-style schedules, offered to plug-in authors so
    they only decide the two orders and the warm-up depth.
    """
    warmup = max(0, min(warmup, len(forwards)))
    order = list(forwards[:warmup])
    for i in range(len(forwards) - warmup):
        order += [forwards[warmup + i], backwards[i]]
    return order + list(backwards[len(forwards) - warmup :])


def validate_placement(placement: Sequence[int], num_stages: int, num_ranks: int) -> list[int]:
    """Check a placement (one rank index per stage) and return it as a list."""
    placement = list(placement)
    if len(placement) != num_stages:
        raise ValueError(
            f"placement must give one rank per stage: got {len(placement)} entries "
            f"for {num_stages} stages"
        )
    for stage, rank in enumerate(placement):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_ranks:
            raise ValueError(
                f"placement puts stage {stage} on rank {rank!r}, but ranks are 0..{num_ranks - 1}"
            )
    return placement


def validate_plan(
    plan: Sequence[Sequence[Action]],
    num_stages: int,
    num_microbatches: int,
    num_ranks: int,
    placement: Sequence[int],
    kinds: str = "FB",
) -> Plan:
    """Check ``plan`` and return it as a list of lists, or raise ``ValueError``.

    Checks: one list per rank; every ``kind`` in ``kinds`` of every
    (stage, micro-batch) exactly once and nothing else; each action on the rank
    ``placement`` gives its stage; each F before its B; and no cycle across
    ranks (:class:`~pipesched.plan.replay.Deadlock`, a ``ValueError`` that names the
    waiting actions). ``kinds="F"`` checks a forward-only plan.
    """
    placement = validate_placement(placement, num_stages, num_ranks)
    if isinstance(plan, (str, bytes)) or not isinstance(plan, Sequence) or len(plan) != num_ranks:
        got = len(plan) if isinstance(plan, Sequence) else type(plan).__name__
        raise ValueError(f"a plan must hold one action list per rank ({num_ranks}), got {got}")
    checked: Plan = []
    seen: dict[Action, int] = {}
    for rank, actions in enumerate(plan):
        if isinstance(actions, (str, bytes)) or not isinstance(actions, Sequence):
            raise ValueError(f"plan entry for rank {rank} must be a list of Action, got {actions!r}")
        row = []
        for position, action in enumerate(actions):
            if not isinstance(action, Action):
                raise ValueError(
                    f"plan for rank {rank} holds {action!r} at position {position}; "
                    f"expected an Action(kind, stage, microbatch)"
                )
            if action.kind not in kinds:
                raise ValueError(f"{action} on rank {rank}: this plan may only hold kinds {kinds!r}")
            if action.stage >= num_stages or action.microbatch >= num_microbatches:
                raise ValueError(
                    f"{action} on rank {rank} is out of range: stages are 0..{num_stages - 1}, "
                    f"micro-batches 0..{num_microbatches - 1}"
                )
            if action in seen:
                raise ValueError(f"{action} appears twice (ranks {seen[action]} and {rank})")
            if placement[action.stage] != rank:
                raise ValueError(
                    f"{action} is on rank {rank}, but stage {action.stage} is placed on "
                    f"rank {placement[action.stage]}"
                )
            if action.kind == "B" and Action("F", action.stage, action.microbatch) not in seen:
                raise ValueError(
                    f"{action} comes before F{action.stage}.{action.microbatch} on rank {rank}; "
                    f"a backward needs its forward first"
                )
            seen[action] = rank
            row.append(action)
        checked.append(row)
    expected = num_stages * num_microbatches * len(kinds)
    if len(seen) != expected:
        missing = [
            str(Action(kind, stage, mb))  # type: ignore[arg-type]
            for kind in kinds
            for stage in range(num_stages)
            for mb in range(num_microbatches)
            if Action(kind, stage, mb) not in seen  # type: ignore[arg-type]
        ]
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"plan is missing {len(missing)} action(s): {shown}")
    replay(checked, num_stages)  # raises Deadlock
    return checked


class PlanCache:
    """The validated plan of a schedule for each micro-batch count, computed once.

    A batch with fewer rows than ``chunks`` runs fewer micro-batches, so a
    pipeline may need several plans; each is validated the first time it is
    asked for, before any task of it runs.
    """

    def __init__(self, schedule: Schedule, num_stages: int, num_ranks: int, placement: Sequence[int]):
        self.schedule = schedule
        self.num_stages = num_stages
        self.num_ranks = num_ranks
        self.placement = list(placement)
        self._plans: dict[int, Plan] = {}

    def __call__(self, num_microbatches: int) -> Plan:
        plan = self._plans.get(num_microbatches)
        if plan is None:
            raw = self.schedule.plan(self.num_stages, num_microbatches, self.num_ranks)
            plan = validate_plan(raw, self.num_stages, num_microbatches, self.num_ranks, self.placement)
            self._plans[num_microbatches] = plan
        return plan
