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

from collections.abc import Mapping, Sequence

from pipesched.plan.action import Action, Plan
from pipesched.plan.lowering import SkipEdge, check_skips
from pipesched.plan.replay import Deadlock, replay

__all__ = [
    "Action",
    "Deadlock",
    "Plan",
    "PlanCache",
    "Schedule",
    "defer_weight_passes",
    "microbatch_groups",
    "one_forward_one_backward",
    "require_one_stage_per_rank",
    "require_v_shape",
    "v_shape_placement",
    "validate_actions_reference",
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

    #: Whether :meth:`plan` is built for the costs of the model it runs. If so, a
    #: pipeline hands it, after every full step, the median measured seconds per
    #: ``(kind, stage)`` through :meth:`use_costs` (and ``pipesched schedule show``
    #: hands it the costs it charts). The engine asks this, never the name.
    wants_costs: bool = False

    def placement(self, num_stages: int, num_ranks: int) -> list[int]:
        """Rank of each stage. Default: stage ``s`` on rank ``s % num_ranks``."""
        return [stage % num_ranks for stage in range(num_stages)]

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        """Per rank, the ordered actions it runs.

        Every F and B exactly once; a W for each backward the schedule splits
        (after its B, on the same rank). See :func:`validate_plan`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement plan()")

    def default_num_stages(self, num_ranks: int) -> int:
        """How many stages to cut the model into for ``num_ranks`` ranks."""
        return num_ranks

    def use_costs(self, costs: Mapping[tuple[str, int], float], comm: float = 0.0) -> bool:
        """Take ``costs`` (seconds per ``(kind, stage)``, as the simulator reads them) for later plans.

        Returns ``True`` when the plans built so far are stale: whoever cached
        them (the pipeline's plan cache) drops them and asks :meth:`plan` again.
        Only called when :attr:`wants_costs` is true; the default ignores them.
        """
        return False

    def describe_plan(self, num_microbatches: int) -> str:
        """What a step report calls the plan :meth:`plan` last gave for ``num_microbatches`` (default: the name)."""
        return self.name

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
    pairs = len(forwards) - warmup
    steady: list[Action] = [None] * (2 * pairs)  # type: ignore[list-item]
    steady[0::2] = forwards[warmup:]  # by slices: a plan at cluster scale has millions of actions
    steady[1::2] = backwards[:pairs]
    return list(forwards[:warmup]) + steady + list(backwards[pairs:])


def defer_weight_passes(order: Sequence[Action], delay: int) -> list[Action]:
    """Split every backward of one rank's order, running each W ``delay`` backwards late.

    The W of the k-th B goes right after the (k + ``delay``)-th B; those left
    go at the end, oldest first. ``delay = 0`` puts each W right after its B
    (no gain, the split's cost only); a larger delay lets the rank move on to
    the next forward or backward, the ones other ranks wait for, and keeps the
    W for a moment nobody waits, at the price of holding ``delay`` more
    micro-batches' activations. The shape of ZB-H1 and interleaved ZB.
    """
    out: list[Action] = []
    pending: list[Action] = []
    for action in order:
        out.append(action)
        if action.kind == "B":
            pending.append(Action("W", action.stage, action.microbatch))
            if len(pending) > delay:
                out.append(pending.pop(0))
    return out + pending


def microbatch_groups(num_microbatches: int, num_ranks: int) -> list[range]:
    """Micro-batches in ``max(1, m // p)`` consecutive groups whose sizes differ by at most one, larger first.

    Looped schedules walk a group through all of a rank's stages before the
    next one; groups of at least ``p`` keep every rank busy (fewer only when
    ``m < p``), for any ``m``, not only multiples of ``p``.
    """
    rounds = max(1, num_microbatches // num_ranks)
    sizes = [num_microbatches // rounds + (1 if i < num_microbatches % rounds else 0) for i in range(rounds)]
    groups, first = [], 0
    for size in sizes:
        groups.append(range(first, first + size))
        first += size
    return groups


def v_shape_placement(num_stages: int, num_ranks: int) -> list[int]:
    """Two stages per rank in a V: stage ``s < p`` on rank ``s``, stage ``s >= p`` on rank ``2p - 1 - s``.

    Rank 0 holds the first and the last stage, so a micro-batch's last forward
    and first backward run where its first forward did, and each rank's two
    stages are equally far from the loss on the way down and up: the
    placement of ZB-V and DualPipeV.
    """
    return [stage if stage < num_ranks else 2 * num_ranks - 1 - stage for stage in range(num_stages)]


def require_v_shape(name: str, num_stages: int, num_ranks: int) -> None:
    """Raise the standard error of schedules that need exactly two stages per rank in a V."""
    if num_stages != 2 * num_ranks:
        raise ValueError(
            f"schedule {name!r} runs two stages per rank in a V (rank r holds stages r and "
            f"2p-1-r), so it needs twice as many stages as ranks; got {num_stages} stages for "
            f"{num_ranks} ranks: use a balance with {2 * num_ranks} entries"
            + (f", or {num_stages // 2} devices" if num_stages % 2 == 0 and num_stages > 0 else "")
        )



class LoopedSchedule(Schedule):
    """Stage s on rank ``s mod p``, ``virtual_stages`` (v ≥ 2) stages per rank: the looped placement.

    Interleaved 1F1B, interleaved zero bubble and looped BFS share it; each
    names in ``one_stage_per_rank`` the schedule to use instead with one stage
    per rank, so the errors say what to change.
    """

    one_stage_per_rank = "gpipe"

    def __init__(self, virtual_stages: int = 2):
        if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 2:
            raise ValueError(
                f"virtual_stages (stages per rank) must be an int >= 2, got {virtual_stages!r}; "
                f"for one stage per rank use {self.one_stage_per_rank!r}"
            )
        self.virtual_stages = virtual_stages

    def default_num_stages(self, num_ranks: int) -> int:
        return self.virtual_stages * num_ranks

    def stages_per_rank(self, num_stages: int, num_ranks: int) -> int:
        """``num_stages / num_ranks``, refused unless a whole number ≥ 2."""
        if num_stages % num_ranks or num_stages < 2 * num_ranks:
            raise ValueError(
                f"schedule {self.name!r} needs the number of stages to be a multiple >= 2 of the "
                f"number of ranks, got {num_stages} stages for {num_ranks} ranks: use a balance with "
                f"{2 * num_ranks} (or {3 * num_ranks}, ...) entries, or schedule={self.one_stage_per_rank!r} "
                f"for one stage per rank"
            )
        return num_stages // num_ranks

    def placement(self, num_stages: int, num_ranks: int) -> list[int]:
        self.stages_per_rank(num_stages, num_ranks)
        return [stage % num_ranks for stage in range(num_stages)]



class VShapeSchedule(Schedule):
    """Two stages per rank in a V: rank r owns stages r and 2p−1−r (ZB-V, DualPipeV)."""

    def default_num_stages(self, num_ranks: int) -> int:
        return 2 * num_ranks

    def placement(self, num_stages: int, num_ranks: int) -> list[int]:
        require_v_shape(self.name, num_stages, num_ranks)
        return v_shape_placement(num_stages, num_ranks)


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
    kinds: str = "FBW",
    skips: Sequence[SkipEdge] = (),
) -> Plan:
    """Check ``plan`` and return it as a list of lists, or raise ``ValueError``.

    ``kinds`` are the kinds the plan may hold. F and B (when in ``kinds``) are
    required: each of every (stage, micro-batch) exactly once. W is optional
    per (stage, micro-batch): where ``W(s, m)`` appears (at most once), it
    splits that backward, and it must come after ``B(s, m)`` on the same rank.
    Every action sits on the rank ``placement`` gives its stage, each F comes
    before its B, and the ranks' orders form no cycle
    (:class:`~pipesched.plan.replay.Deadlock`, a ``ValueError`` that names the
    waiting actions). ``kinds="FB"`` refuses split backwards (an engine that
    cannot run W); ``kinds="F"`` checks a forward-only plan. ``skips``: the
    model's skip connections (:class:`~pipesched.plan.lowering.SkipEdge`),
    whose edges join the deadlock check.

    The checks run on arrays (:mod:`pipesched.plan.fast_simulate`); a plan that
    fails one is walked by :func:`validate_actions_reference`, which words the error.
    """
    placement = validate_placement(placement, num_stages, num_ranks)
    skips = check_skips(skips, num_stages)
    if not isinstance(kinds, str) or not kinds or any(k not in "FBW" for k in kinds) or (
        "W" in kinds and "B" not in kinds
    ):
        raise ValueError(f"kinds must be 'FBW', 'FB' or 'F' (W needs B), got {kinds!r}")
    if isinstance(plan, (str, bytes)) or not isinstance(plan, Sequence) or len(plan) != num_ranks:
        got = len(plan) if isinstance(plan, Sequence) else type(plan).__name__
        raise ValueError(f"a plan must hold one action list per rank ({num_ranks}), got {got}")
    from pipesched.plan.fast_simulate import validate_plan_fast  # numpy loads with the first check
    from pipesched.plan.plan_arrays import NotFast

    try:
        return validate_plan_fast(plan, num_stages, num_microbatches, placement, kinds, skips)
    except NotFast:  # some check fails: the reference walk names the first offending action
        return validate_actions_reference(plan, num_stages, num_microbatches, placement, kinds, skips)


def validate_actions_reference(
    plan: Sequence[Sequence[Action]],
    num_stages: int,
    num_microbatches: int,
    placement: Sequence[int],
    kinds: str,
    skips: Sequence[SkipEdge],
) -> Plan:
    """:func:`validate_plan`'s per-action checks one by one, then replay.

    The yardstick of the array checks, and what words every error.
    """
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
                if action.kind == "W":
                    raise ValueError(
                        f"{action} on rank {rank}: this plan may only hold kinds {kinds!r}, and W "
                        f"(a split backward's weight-gradient pass) is not one of them; use a "
                        f"schedule that does not split backwards"
                    )
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
            if action.kind != "F":
                before = Action("F" if action.kind == "B" else "B", action.stage, action.microbatch)
                if seen.get(before) != rank:  # same stage, hence the same rank when present
                    raise ValueError(
                        f"{action} comes before {before} on rank {rank}; a backward needs its forward first"
                        if action.kind == "B" else
                        f"{action} comes before {before} on rank {rank} (or {before} is missing); the "
                        f"weight-gradient pass W of a split backward runs after its input-gradient part B"
                    )
            seen[action] = rank
            row.append(action)
        checked.append(row)
    required = [k for k in "FB" if k in kinds]
    present = sum(1 for a in seen if a.kind in required)
    if present != num_stages * num_microbatches * len(required):
        missing = [
            str(Action(kind, stage, mb))  # type: ignore[arg-type]
            for kind in required
            for stage in range(num_stages)
            for mb in range(num_microbatches)
            if Action(kind, stage, mb) not in seen  # type: ignore[arg-type]
        ]
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"plan is missing {len(missing)} action(s): {shown}")
    replay(checked, num_stages, skips=skips)  # raises Deadlock
    return checked


class PlanCache:
    """The validated plan of a schedule for each micro-batch count, computed once.

    A batch with fewer rows than ``chunks`` runs fewer micro-batches, so a
    pipeline may need several plans; each is validated the first time it is
    asked for, before any task of it runs.

    ``split_backward`` says whether the engine that will run the plans runs W
    actions. Until it does, a plan that splits a backward is refused here,
    with the schedule's name, instead of running W as a second backward.
    """

    def __init__(
        self,
        schedule: Schedule,
        num_stages: int,
        num_ranks: int,
        placement: Sequence[int],
        split_backward: bool = False,
        skips: Sequence[SkipEdge] = (),
    ):
        self.schedule = schedule
        self.skips = check_skips(skips, num_stages)
        self.num_stages = num_stages
        self.num_ranks = num_ranks
        self.placement = list(placement)
        self.split_backward = split_backward
        self._plans: dict[int, Plan] = {}

    def __call__(self, num_microbatches: int) -> Plan:
        plan = self._plans.get(num_microbatches)
        if plan is None:
            raw = self.schedule.plan(self.num_stages, num_microbatches, self.num_ranks)
            if not self.split_backward and _holds_weight_passes(raw):
                raise ValueError(
                    f"schedule {self.schedule.name!r} splits backwards into B and W (weight-gradient) "
                    f"actions, which this engine does not run yet; pick a schedule without W "
                    f"(gpipe, 1f1b, interleaved-1f1b, looped-bfs), or study this one with "
                    f"pipesched.simulate / `pipesched schedule show {self.schedule.name}`"
                )
            kinds = "FBW" if self.split_backward else "FB"
            plan = validate_plan(raw, self.num_stages, num_microbatches, self.num_ranks, self.placement, kinds,
                                 self.skips)
            self._plans[num_microbatches] = plan
        return plan


def _holds_weight_passes(plan: object) -> bool:
    """Whether a (not yet validated) plan holds a W action; malformed plans are validate_plan's to name."""
    if not isinstance(plan, Sequence):
        return False
    return any(
        isinstance(row, Sequence) and any(isinstance(a, Action) and a.kind == "W" for a in row)
        for row in plan
    )
