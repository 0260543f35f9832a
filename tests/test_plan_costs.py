"""True costs for ``"auto"``: an unsplit backward costs its measured whole, not B + W.

Issue #24: on a small GPT ``auto`` ran 1.27-1.65x slower than 1F1B because its
warm-up measured only split backwards and priced an unsplit one at B + W (7.19
ms on the last stage, against 1.76 ms for the real whole backward). These
tests give the planner cost tables with a measured whole backward (``BW``) and
check, with the simulator and plans built independently here, that it picks an
unsplit (1F1B-like) order exactly where splitting costs more than the bubble it
removes, and still splits where splitting pays.
"""

from __future__ import annotations

import pytest

from pipesched import Action, get_schedule, simulate
from pipesched.plan.costs import FUSED, as_cost_function, median_costs, task_overhead
from pipesched.plan.record import TaskRecord
from pipesched.schedules.auto import merge_measured

P, M = 4, 8


def table(f: float, b: float, w: float, whole: float | None, stages: int = P) -> dict:
    costs = {}
    for s in range(stages):
        costs.update({("F", s): f, ("B", s): b, ("W", s): w})
        if whole is not None:
            costs[(FUSED, s)] = whole
    return costs


def built_in_makespans(costs: dict) -> dict[str, float]:
    return {name: simulate(get_schedule(name).plan(P, M, P), costs).makespan for name in ("gpipe", "1f1b", "zb-h1")}


def test_an_unsplit_backward_costs_its_measured_whole_and_a_split_one_its_parts():
    costs = table(1.0, 3.0, 2.0, whole=1.5)
    split = as_cost_function(costs, split=[(0, 0)])
    assert split(Action("B", 0, 0)) == 3.0 and split(Action("W", 0, 0)) == 2.0
    assert split(Action("B", 0, 1)) == 1.5  # unsplit: the whole backward as measured
    without = as_cost_function(table(1.0, 3.0, 2.0, whole=None))
    assert without(Action("B", 0, 1)) == 5.0  # no whole measured: B + W, as before


def test_auto_1_27x_slower_than_1f1b_on_a_gpt_it_picks_an_unsplit_order_when_splitting_costs_more():
    """The GPT's shape: a split backward (B + W) costs about 4x the whole one."""
    costs = table(1.0, 4.0, 3.2, whole=1.8)
    schedule = get_schedule("auto", costs=costs)
    plan = schedule.plan(P, M, P)
    assert not any(a.kind == "W" for row in plan for a in row)  # no backward split
    makespans = built_in_makespans(costs)
    assert simulate(plan, costs).makespan <= min(makespans.values())
    assert makespans["1f1b"] < makespans["zb-h1"]
    described = schedule.describe_plan(M)
    assert "no backward split" in described and "whole cost (BW)" in described
    for name, seconds in makespans.items():  # names what it was compared with, at the costs it used
        assert f"{name} {seconds:.4g}" in described


def test_where_splitting_pays_auto_still_splits_and_beats_1f1b():
    costs = table(1.0, 1.0, 1.0, whole=2.05)  # split adds almost nothing: W fills the bubble
    plan = get_schedule("auto", costs=costs).plan(P, M, P)
    assert any(a.kind == "W" for row in plan for a in row)
    makespans = built_in_makespans(costs)
    assert simulate(plan, costs).makespan < makespans["1f1b"]


@pytest.mark.parametrize("ratio", [0.5, 0.8, 1.0, 1.2, 2.0])
def test_auto_is_never_slower_than_a_built_in_on_costs_with_a_whole_backward(ratio):
    """B + W = ratio x the whole backward: whichever way wins, auto is at least as fast."""
    costs = table(1.0, 1.2 * ratio, 0.8 * ratio, whole=2.0)
    costs[("F", P - 1)] = 2.5  # a heavy last stage (an LM head)
    plan = get_schedule("auto", costs=costs).plan(P, M, P)
    assert simulate(plan, costs).makespan <= min(built_in_makespans(costs).values()) * (1 + 1e-9)


def records(gap: float) -> list[TaskRecord]:
    """One rank, stage 0: mb 0 whole (B 1.0), mb 1 split (B 0.7, then W 0.6 after ``gap``), F 0.5 each."""
    return [
        TaskRecord(0, 0, 0, "F", 0.0, 0.5), TaskRecord(0, 0, 1, "F", 0.6, 1.1),
        TaskRecord(0, 0, 0, "B", 1.2, 2.2),
        TaskRecord(0, 0, 1, "B", 2.3, 3.0), TaskRecord(0, 0, 1, "W", 3.0 + gap, 3.6 + gap),
    ]


def test_median_costs_gives_split_parts_the_whole_backward_and_the_engine_cost_per_task():
    costs = median_costs(records(gap=0.05))
    assert task_overhead(records(gap=0.05)) == pytest.approx(0.05)
    assert costs == pytest.approx({("F", 0): 0.55, ("B", 0): 0.75, ("W", 0): 0.65, (FUSED, 0): 1.05})


def test_a_w_that_started_before_its_b_ended_is_not_overhead():
    assert task_overhead(records(gap=-0.1)) == 0.0
    assert task_overhead([TaskRecord(0, 0, 0, "F", 0.0, 1.0), TaskRecord(0, 0, 0, "B", 1.5, 2.0)]) == 0.0


def test_auto_remembers_the_split_costs_after_a_step_that_ran_every_backward_whole():
    warm = table(1.0, 4.0, 3.2, whole=1.8, stages=2)
    whole_step = {("F", 0): 1.1, ("B", 0): 1.9, ("F", 1): 1.1, ("B", 1): 1.7}  # an unsplit plan ran
    merged = merge_measured(warm, whole_step, 2)
    assert merged[(FUSED, 0)] == 1.9 and merged[(FUSED, 1)] == 1.7
    assert merged[("B", 0)] == 4.0 and merged[("W", 1)] == 3.2 and merged[("F", 0)] == 1.1
    split_step = table(1.0, 3.0, 2.0, whole=None, stages=2)
    assert merge_measured(merged, split_step, 2)[(FUSED, 1)] == 1.7  # kept from the step that measured it


def test_auto_warm_up_with_one_micro_batch_runs_whole_backwards():
    plan = get_schedule("auto").plan(2, 1, 2)
    assert not any(a.kind == "W" for row in plan for a in row)


def test_on_measured_costs_auto_keeps_the_built_in_unless_its_plan_is_clearly_faster():
    """The GPT's full run: a split plan 2 % faster in simulation than 1F1B ran 1.2x slower on the machine.
    A gain within the noise margin keeps the best built-in's plan."""
    from pipesched.schedules.auto import NOISE_MARGIN

    costs = table(1.0, 1.3, 1.3, whole=2.0)  # splitting buys a little (3.6 % here)
    given = get_schedule("auto", costs=costs)
    given_plan = given.plan(P, M, P)
    onefoneb = simulate(get_schedule("1f1b").plan(P, M, P), costs).makespan
    gain = 1 - simulate(given_plan, costs).makespan / onefoneb
    assert 0 < gain < NOISE_MARGIN  # given costs are exact: the faster plan stands
    measured = get_schedule("auto")
    measured.plan(P, M, P)  # the warm-up
    measured.use_costs(costs)
    plan = measured.plan(P, M, P)
    assert plan == get_schedule("1f1b").plan(P, M, P)
    assert "within the 5 % noise margin" in measured.describe_plan(M)
    clear = table(1.0, 1.1, 1.1, whole=2.0)  # splitting buys much more than the margin (13 %)
    learner = get_schedule("auto")
    learner.use_costs(clear)
    assert any(a.kind == "W" for row in learner.plan(P, M, P) for a in row)
