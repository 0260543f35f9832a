"""Split backwards at plan level: W actions, the one dependency rule, validation, and the simulator.

A plan splits the backward of (s, m) by holding W(s, m): B(s, m) is then the
input-gradient part and W(s, m) the weight-gradient part, after it on the same
rank. Every expectation here is worked out by hand from that definition.
"""

from __future__ import annotations

import sys

import pytest

from pipesched import Action, Deadlock, Pipeline, Schedule, TaskRecord, get_schedule, simulate, validate_plan
from pipesched.plan.lowering import GRADIENT, STATE, Edge, Lowering, inputs_of
from pipesched.plan.lowering import dependencies as rule
from pipesched.plan.schedule import PlanCache, defer_weight_passes, one_forward_one_backward
from pipesched.plan.simulate import IncompletePlan, lower_bound, peak_inflight


def F(s: int, m: int) -> Action:
    return Action("F", s, m)


def B(s: int, m: int) -> Action:
    return Action("B", s, m)


def W(s: int, m: int) -> Action:
    return Action("W", s, m)


def costs(f: float = 1.0, b: float = 1.0, w: float | None = 1.0, stages: int = 2) -> dict[tuple[str, int], float]:
    table = {(kind, s): value for kind, value in (("F", f), ("B", b), ("W", w)) if value is not None
             for s in range(stages)}
    return table


def zb_h1(p: int, m: int) -> list[list[Action]]:
    """ZB-H1 from its definition: 1F1B's order, each rank r running its W's r backwards late."""
    return [
        defer_weight_passes(one_forward_one_backward([F(r, i) for i in range(m)], [B(r, i) for i in range(m)],
                                                     p - 1 - r), delay=r)
        for r in range(p)
    ]


def split_two_ranks_one_microbatch() -> list[list[Action]]:
    return [[F(0, 0), B(0, 0), W(0, 0)], [F(1, 0), B(1, 0), W(1, 0)]]


# --------------------------------------------------------------------- action


def test_w_actions_print_and_compare_like_the_others():
    assert str(Action("W", 2, 3)) == "W2.3"
    assert Action("W", 2, 3) == W(2, 3) and hash(Action("W", 2, 3)) == hash(W(2, 3))
    assert sorted([W(0, 0), F(0, 0), B(0, 0)]) == [B(0, 0), F(0, 0), W(0, 0)]
    with pytest.raises(ValueError, match=r"one of \('F', 'B', 'W'\)"):
        Action("I", 0, 0)  # type: ignore[arg-type]


def test_there_is_one_dependency_rule():
    # it lives in the lowering only: action.py no longer re-exports it (that alias was an import cycle)
    assert not hasattr(sys.modules[Action.__module__], "dependencies")
    assert inputs_of(W(2, 3), 4) == (Edge(B(2, 3), W(2, 3), STATE),)
    assert rule(W(2, 3), 4) == (B(2, 3),)
    # what B waits for does not change when its backward is split
    assert rule(B(2, 3), 4) == (F(2, 3), B(3, 3))


def test_weight_passes_add_no_transfer():
    unsplit = get_schedule("1f1b").plan(3, 4, 3)
    split = [defer_weight_passes(row, delay=rank) for rank, row in enumerate(unsplit)]
    assert [(t.producer, t.consumer) for t in Lowering(split, 3).transfers] == [
        (t.producer, t.consumer) for t in Lowering(unsplit, 3).transfers
    ]
    assert all(t.carries != STATE for t in Lowering(split, 3).transfers)
    assert {t.carries for t in Lowering(split, 3).receives(B(0, 1))} == {GRADIENT}


def test_defer_weight_passes_by_hand():
    order = [F(0, 0), F(0, 1), B(0, 0), F(0, 2), B(0, 1), B(0, 2)]
    assert defer_weight_passes(order, 0) == [F(0, 0), F(0, 1), B(0, 0), W(0, 0), F(0, 2), B(0, 1), W(0, 1),
                                             B(0, 2), W(0, 2)]
    assert defer_weight_passes(order, 1) == [F(0, 0), F(0, 1), B(0, 0), F(0, 2), B(0, 1), W(0, 0), B(0, 2),
                                             W(0, 1), W(0, 2)]
    assert defer_weight_passes(order, 5) == order + [W(0, 0), W(0, 1), W(0, 2)]


# ----------------------------------------------------------------- validation


def test_valid_split_and_mixed_plans_pass():
    validate_plan(split_two_ranks_one_microbatch(), 2, 1, 2, [0, 1])
    mixed = [[F(0, 0), F(0, 1), B(0, 0), B(0, 1), W(0, 1)], [F(1, 0), B(1, 0), W(1, 0), F(1, 1), B(1, 1)]]
    assert validate_plan(mixed, 2, 2, 2, [0, 1]) == mixed


@pytest.mark.parametrize(
    "plan, pattern",
    [
        # W twice
        ([[F(0, 0), B(0, 0), W(0, 0), W(0, 0)], [F(1, 0), B(1, 0)]], "W0.0 appears twice"),
        # W before its B, on the right rank
        ([[F(0, 0), W(0, 0), B(0, 0)], [F(1, 0), B(1, 0)]], r"W0\.0 comes before B0\.0 on rank 0"),
        # W without its B anywhere (B is also missing; the W is named first)
        ([[F(0, 0), W(0, 0)], [F(1, 0), B(1, 0)]], r"W0\.0 comes before B0\.0 on rank 0 \(or B0\.0 is missing\)"),
        # W on a rank that does not own its stage
        ([[F(0, 0), B(0, 0)], [F(1, 0), B(1, 0), W(0, 0)]], "W0.0 is on rank 1, but stage 0 is placed on rank 0"),
        # W of a micro-batch that does not exist
        ([[F(0, 0), B(0, 0), W(0, 3)], [F(1, 0), B(1, 0)]], "W0.3 on rank 0 is out of range"),
    ],
)
def test_each_w_violation_is_named(plan, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_plan(plan, 2, 1, 2, [0, 1])


def test_an_engine_without_w_refuses_it_by_kind():
    with pytest.raises(ValueError, match=r"W0\.0 on rank 0: this plan may only hold kinds 'FB', and W"):
        validate_plan(split_two_ranks_one_microbatch(), 2, 1, 2, [0, 1], kinds="FB")
    with pytest.raises(ValueError, match="kinds must be"):
        validate_plan(split_two_ranks_one_microbatch(), 2, 1, 2, [0, 1], kinds="FW")


def test_a_cycle_through_split_backwards_is_a_deadlock():
    # rank 0 runs B0.1 before F0.1's partner: rank 1 waits at F1.1 for F0.1, rank 0 at B0.0 for B1.0
    plan = [[F(0, 0), B(0, 0), W(0, 0), F(0, 1), B(0, 1), W(0, 1)],
            [F(1, 1), F(1, 0), B(1, 0), W(1, 0), B(1, 1), W(1, 1)]]
    with pytest.raises(Deadlock, match="rank 0 at B0.0 waits for B1.0; rank 1 at F1.1 waits for F0.1"):
        validate_plan(plan, 2, 2, 2, [0, 1])


def test_replay_names_a_w_that_waits_in_a_deadlock():
    # the simulator does not validate ordering, so a W ahead of its B shows up as a wait
    plan = [[F(0, 0), W(0, 0), B(0, 0)], [F(1, 0), B(1, 0), W(1, 0)]]
    with pytest.raises(Deadlock, match=r"rank 0 at W0\.0 waits for B0\.0"):
        simulate(plan, costs())


class ZBFlavouredGPipe(Schedule):
    name = "split-gpipe"

    def plan(self, num_stages, num_microbatches, num_ranks):
        return [
            [F(s, m) for m in range(num_microbatches)]
            + [a for m in reversed(range(num_microbatches)) for a in (B(s, m), W(s, m))]
            for s in range(num_stages)
        ]


def test_plan_cache_refuses_w_until_the_engine_runs_it():
    cache = PlanCache(ZBFlavouredGPipe(), 2, 2, [0, 1])
    with pytest.raises(ValueError, match="schedule 'split-gpipe' splits backwards into B and W"):
        cache(2)
    assert PlanCache(ZBFlavouredGPipe(), 2, 2, [0, 1], split_backward=True)(2)[0][-1] == W(0, 0)


# ------------------------------------------------------------------ simulator


def test_split_plan_by_hand():
    # p = 2, m = 1, F = B = W = 1: F0.0 [0,1], F1.0 [1,2], B1.0 [2,3], then rank 1's W1.0 [3,4]
    # while rank 0 runs B0.0 [3,4], then W0.0 [4,5]. Makespan 5; the W1.0 fills rank 1's tail.
    sim = simulate(split_two_ranks_one_microbatch(), costs())
    assert sim.start == {F(0, 0): 0, B(0, 0): 3, W(0, 0): 4, F(1, 0): 1, B(1, 0): 2, W(1, 0): 3}
    assert sim.makespan == 5.0
    assert sim.critical_path == [F(0, 0), F(1, 0), B(1, 0), B(0, 0), W(0, 0)]
    assert sim.busy == [3.0, 3.0] and sim.idle == [2.0, 2.0]
    assert sim.peak_inflight == [1, 1]
    bound = lower_bound(split_two_ranks_one_microbatch(), costs())
    assert (bound.work, bound.chain) == (3.0, 5.0)  # chain: F F B B then W0.0 after B0.0


def test_one_f_one_b_is_unchanged_by_w_and_priced_b_plus_w_when_w_is_given():
    for p in range(1, 5):
        for m in range(1, 9):
            plan = get_schedule("1f1b").plan(p, m, p)
            assert simulate(plan, costs(1.0, 2.0, None, p)).makespan == (m + p - 1) * 3.0
            assert simulate(plan, lambda kind, stage: 1.0 if kind == "F" else 2.0).makespan == (m + p - 1) * 3.0
            # a mapping that gives W prices an unsplit backward as B + W
            assert simulate(plan, costs(1.0, 2.0, 0.5, p)).makespan == (m + p - 1) * 3.5


def test_callable_costs_are_asked_per_kind():
    asked = set()

    def cost(kind, stage):
        asked.add(kind)
        return {"F": 1.0, "B": 1.0, "W": 1.0}[kind]

    assert simulate(split_two_ranks_one_microbatch(), cost).makespan == 5.0
    assert asked == {"F", "B", "W"}


@pytest.mark.parametrize("p", range(1, 7))
def test_zb_h1_closed_form_and_memory(p):
    for m in range(p, 3 * p + 1):
        for c in (1.0, 2.5):
            sim = simulate(zb_h1(p, m), costs(c, c, c, p))
            # m(F + B + W) + (p - 1)(F + B - W)
            assert sim.makespan == pytest.approx(m * 3 * c + (p - 1) * c)
            assert max(sim.peak_inflight) <= p


def test_peak_inflight_holds_a_split_backward_until_its_w():
    assert peak_inflight([F(0, 0), B(0, 0), F(0, 1), B(0, 1)]) == 1
    assert peak_inflight([F(0, 0), B(0, 0), F(0, 1), B(0, 1), W(0, 0), W(0, 1)]) == 2
    assert peak_inflight([F(0, 0), B(0, 0), W(0, 0), F(0, 1), B(0, 1), W(0, 1)]) == 1
    # a mix: only (0, 1) is split
    assert peak_inflight([F(0, 0), F(0, 1), B(0, 1), B(0, 0), F(0, 2), W(0, 1)]) == 2


def test_costs_must_price_w_for_a_split_plan():
    with pytest.raises(ValueError, match=r"no entry for \('W', 1\) \(needed by W1\.0\).*weight-gradient"):
        simulate(split_two_ranks_one_microbatch(), costs(w=None))


def test_a_w_without_its_b_is_an_incomplete_plan():
    with pytest.raises(IncompletePlan, match="W0.0 on rank 0 needs B0.0"):
        simulate([[F(0, 0), W(0, 0)]], costs(stages=1))


def test_measured_split_records_price_split_and_unsplit_backwards():
    zb = zb_h1(3, 5)
    table = costs(1.0, 2.0, 0.5, 3)
    recorded = simulate(zb, table).records()
    assert any(r.kind == "W" for r in recorded)
    # the split run replays exactly from its own records
    assert simulate(zb, recorded).makespan == simulate(zb, table).makespan
    # and prices 1F1B's unsplit backwards as the measured B + W: the same as the table's rule
    one_f = get_schedule("1f1b").plan(3, 5, 3)
    assert simulate(one_f, recorded).makespan == simulate(one_f, table).makespan == (5 + 2) * 3.5


def test_whole_backward_records_cannot_price_a_split_plan():
    records = simulate(get_schedule("1f1b").plan(2, 2, 2), costs(1.0, 2.0, None)).records()
    records += [TaskRecord(0, 0, 9, "W", 0.0, 1.0)]  # a W of some other micro-batch: W is known, B/in is not
    with pytest.raises(ValueError, match="only hold whole backwards of stage 1"):
        simulate(zb_h1(2, 2), records)


def test_one_f_one_b_with_deferred_weights_is_valid_for_every_delay():
    for p in range(1, 5):
        for m in range(1, 7):
            for delay in range(0, 4):
                plan = [
                    defer_weight_passes(one_forward_one_backward(
                        [F(r, i) for i in range(m)], [B(r, i) for i in range(m)], p - 1 - r), delay)
                    for r in range(p)
                ]
                validate_plan(plan, p, m, p, list(range(p)))
