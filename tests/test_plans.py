"""Plan properties of the built-in schedules, checked against independent facts.

Each test derives its expectation from the schedule's definition (closed-form
makespans, in-flight bounds, every action once) rather than from the code
under test.
"""

from __future__ import annotations

import pytest

from pipesched import Action, Deadlock, get_schedule, validate_plan
from pipesched.plan.replay import replay

SHAPES = [(p, m) for p in range(1, 5) for m in range(1, 13)]


def stages_for(name: str, p: int, v: int = 2) -> int:
    return v * p if name.startswith("interleaved") else p


def inflight_peaks(plan: list[list[Action]]) -> list[int]:
    """Per rank: most micro-batches forwarded and not yet backwarded, walking the rank's list."""
    peaks = []
    for row in plan:
        live, peak = 0, 0
        for action in row:
            live += 1 if action.kind == "F" else -1
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved-1f1b"])
@pytest.mark.parametrize("p,m", SHAPES)
def test_every_action_exactly_once_on_its_rank_and_validates(name, p, m):
    schedule = get_schedule(name)
    s = stages_for(name, p)
    placement = schedule.placement(s, p)
    plan = schedule.plan(s, m, p)
    flat = [a for row in plan for a in row]
    expected = {Action(k, st, mb) for k in "FB" for st in range(s) for mb in range(m)}
    assert len(flat) == len(expected) and set(flat) == expected
    for rank, row in enumerate(plan):
        assert all(placement[a.stage] == rank for a in row)
        for a in row:
            if a.kind == "B":
                assert row.index(Action("F", a.stage, a.microbatch)) < row.index(a)
    validate_plan(plan, s, m, p, placement)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", SHAPES)
def test_fill_drain_makespan_closed_form(name, p, m):
    f, b = 1.0, 2.5
    plan = get_schedule(name).plan(p, m, p)
    result = replay(plan, p, lambda a: f if a.kind == "F" else b)
    assert result.makespan == pytest.approx((m + p - 1) * (f + b))


@pytest.mark.parametrize("p,m", SHAPES)
def test_one_f_one_b_inflight_bounded_by_ranks_left(p, m):
    peaks = inflight_peaks(get_schedule("1f1b").plan(p, m, p))
    assert peaks == [min(m, p - r) for r in range(p)]


@pytest.mark.parametrize("p,m", SHAPES)
def test_gpipe_holds_every_microbatch(p, m):
    assert inflight_peaks(get_schedule("gpipe").plan(p, m, p)) == [m] * p


@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("p,m", [(p, m) for p in range(2, 5) for m in range(1, 17)])
def test_interleaving_shrinks_the_bubble(v, p, m):
    """Same model cut into v·p stages of 1/v the cost: never slower than 1F1B, and the
    bubble is (p-1)(F+B)/v instead of (p-1)(F+B) whenever p divides m."""
    f, b = 1.0, 2.0
    inter = get_schedule("interleaved-1f1b", virtual_stages=v)
    plan = inter.plan(v * p, m, p)
    validate_plan(plan, v * p, m, p, inter.placement(v * p, p))
    short = replay(plan, v * p, lambda a: (f if a.kind == "F" else b) / v).makespan
    long = replay(get_schedule("1f1b").plan(p, m, p), p, lambda a: f if a.kind == "F" else b).makespan
    assert short <= long + 1e-9
    if m % p == 0:
        assert short == pytest.approx(m * (f + b) + (p - 1) * (f + b) / v)
        assert short < long


def test_interleaved_refuses_bad_stage_counts():
    schedule = get_schedule("interleaved")
    for stages, ranks in [(4, 4), (6, 4), (3, 2)]:
        with pytest.raises(ValueError, match="multiple >= 2 of the number of ranks"):
            schedule.plan(stages, 4, ranks)
    with pytest.raises(ValueError, match="virtual_stages"):
        get_schedule("interleaved", virtual_stages=1)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_one_stage_per_rank_schedules_refuse_other_shapes(name):
    with pytest.raises(ValueError, match="exactly one stage per rank"):
        get_schedule(name).plan(4, 4, 2)


class TestValidatePlan:
    def good(self):
        return get_schedule("1f1b").plan(2, 2, 2)

    def test_deadlock_names_the_waiting_actions(self):
        # rank 0 runs B0.0 before it ever forwards micro-batch 1; rank 1 waits for F0.1.
        plan = [
            [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)],
            [Action("F", 1, 1), Action("F", 1, 0), Action("B", 1, 0), Action("B", 1, 1)],
        ]
        with pytest.raises(Deadlock) as info:
            validate_plan(plan, 2, 2, 2, [0, 1])
        message = str(info.value)
        assert "deadlock" in message
        assert "rank 0 at B0.0 waits for B1.0" in message
        assert "rank 1 at F1.1 waits for F0.1" in message
        assert isinstance(info.value, ValueError)

    @pytest.mark.parametrize(
        "mutate, pattern",
        [
            (lambda plan: plan[:1], "one action list per rank"),
            (lambda plan: [plan[0] + [plan[0][0]], plan[1]], "appears twice"),
            (lambda plan: [plan[0][:-1], plan[1]], "missing 1 action"),
            (lambda plan: [plan[1], plan[0]], "placed on rank"),
            (lambda plan: [plan[0] + ["F0.0"], plan[1]], "expected an Action"),
            (lambda plan: [plan[0] + [Action("F", 0, 7)], plan[1]], "out of range"),
            (lambda plan: [list(reversed(plan[0])), plan[1]], "before F0"),
        ],
    )
    def test_malformed_plans_are_refused(self, mutate, pattern):
        with pytest.raises(ValueError, match=pattern):
            validate_plan(mutate(self.good()), 2, 2, 2, [0, 1])

    def test_forward_only_plan(self):
        plan = [[a for a in row if a.kind == "F"] for row in self.good()]
        validate_plan(plan, 2, 2, 2, [0, 1], kinds="F")
        with pytest.raises(ValueError, match="may only hold kinds"):
            validate_plan(self.good(), 2, 2, 2, [0, 1], kinds="F")


def test_action_value_semantics():
    a = Action("F", 3, 1)
    assert str(a) == "F3.1" and a == Action("F", 3, 1) and hash(a) == hash(Action("F", 3, 1))
    with pytest.raises(AttributeError):
        a.stage = 2  # type: ignore[misc]
    for bad in [("X", 0, 0), ("F", -1, 0), ("B", 0, 1.5), ("F", True, 0)]:
        with pytest.raises(ValueError):
            Action(*bad)  # type: ignore[arg-type]


def test_replay_of_a_large_plan_keeps_the_closed_form():
    """120k actions: the walk is event-driven, one visit per action."""
    plan = get_schedule("1f1b").plan(8, 7500, 8)
    assert replay(plan, 8).makespan == (7500 + 7) * 2
