"""The simulator against hand-computed runs and the closed forms of the papers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesched import Action, Deadlock, TaskRecord, get_schedule
from pipesched.plan.simulate import IncompletePlan, LowerBound, lower_bound, simulate


def F(stage: int, mb: int) -> Action:
    return Action("F", stage, mb)


def B(stage: int, mb: int) -> Action:
    return Action("B", stage, mb)


def uniform(f: float, b: float):
    return lambda kind, stage: f if kind == "F" else b


def plan_of(name: str, p: int, m: int, v: int = 1):
    if name == "interleaved-1f1b":
        return get_schedule(name, virtual_stages=v).plan(v * p, m, p)
    return get_schedule(name).plan(p, m, p)


# --------------------------------------------------------------- hand-computed


def test_gpipe_two_ranks_two_microbatches_by_hand():
    # F = 1, B = 2, p = 2, m = 2.
    #   rank 0: F0.0 [0,1]  F0.1 [1,2]                      B0.1 [5,7]  B0.0 [7,9]
    #   rank 1:             F1.0 [1,2]  F1.1 [2,3]  B1.1 [3,5]  B1.0 [5,7]
    # B0.1 waits for B1.1 (ends 5); B0.0 for B0.1 and B1.0 (both end 7).
    sim = simulate(plan_of("gpipe", 2, 2), uniform(1.0, 2.0))
    assert sim.makespan == 9.0
    assert sim.start[B(0, 1)] == 5.0 and sim.end[B(0, 0)] == 9.0
    assert sim.start[F(1, 1)] == 2.0 and sim.end[B(1, 0)] == 7.0
    assert sim.busy == [6.0, 6.0]
    assert sim.idle == [3.0, 3.0]
    assert sim.bubble_over_total == [pytest.approx(3 / 9)] * 2
    assert sim.bubble_over_ideal == [pytest.approx(3 / 6)] * 2  # (p - 1) / m = 1/2
    assert sim.overall_bubble_over_total == pytest.approx(6 / 18)
    assert sim.overall_bubble_over_ideal == pytest.approx(0.5)
    assert sim.peak_inflight == [2, 2]
    # Each link waits for the one before; ties prefer the rank's own previous action.
    assert sim.critical_path == [F(0, 0), F(1, 0), F(1, 1), B(1, 1), B(0, 1), B(0, 0)]


def test_1f1b_two_ranks_two_microbatches_by_hand():
    # rank 0 (one warm-up F): F0.0 [0,1]  F0.1 [1,2]  B0.0 [4,6]  B0.1 [7,9]
    # rank 1 (no warm-up):    F1.0 [1,2]  B1.0 [2,4]  F1.1 [4,5]  B1.1 [5,7]
    sim = simulate(plan_of("1f1b", 2, 2), uniform(1.0, 2.0))
    assert [sim.start[a] for a in (F(0, 0), F(0, 1), B(0, 0), B(0, 1))] == [0.0, 1.0, 4.0, 7.0]
    assert [sim.start[a] for a in (F(1, 0), B(1, 0), F(1, 1), B(1, 1))] == [1.0, 2.0, 4.0, 5.0]
    assert sim.makespan == 9.0
    assert sim.peak_inflight == [2, 1]


def test_comm_on_a_two_rank_chain():
    # One micro-batch over two ranks: F0 [0,1], hop c, F1 [1+c, 2+c], B1 [2+c, 4+c], hop c, B0 [4+2c, 6+2c].
    plan = [[F(0, 0), B(0, 0)], [F(1, 0), B(1, 0)]]
    for c in (0.0, 0.25, 3.0):
        sim = simulate(plan, uniform(1.0, 2.0), comm=c)
        assert sim.makespan == pytest.approx(6.0 + 2 * c)
        assert sim.start[F(1, 0)] == pytest.approx(1.0 + c)
        assert sim.start[B(0, 0)] == pytest.approx(4.0 + 2 * c)


def test_comm_is_not_charged_within_a_rank():
    # Two stages on one rank: no hop, so comm changes nothing.
    plan = [[F(0, 0), F(1, 0), B(1, 0), B(0, 0)]]
    assert simulate(plan, uniform(1.0, 2.0), comm=5.0).makespan == 6.0


def test_critical_path_is_contiguous_and_sums_to_makespan():
    costs = {("F", 0): 1.0, ("F", 1): 3.0, ("F", 2): 0.5, ("B", 0): 2.0, ("B", 1): 4.0, ("B", 2): 1.5}
    comm = 0.25
    sim = simulate(plan_of("1f1b", 3, 5), costs, comm=comm)
    path = sim.critical_path
    assert sim.start[path[0]] == 0.0
    assert sim.end[path[-1]] == pytest.approx(sim.makespan)
    for before, after in zip(path, path[1:]):
        hop = comm if sim.rank_of[before] != sim.rank_of[after] else 0.0
        assert sim.start[after] == pytest.approx(sim.end[before] + hop)


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("f, b", [(1.0, 2.0), (2.0, 1.0), (1.5, 1.5)])
def test_gpipe_and_1f1b_makespan_closed_form(name, f, b):
    for p in range(1, 5):
        for m in range(1, 13):
            sim = simulate(plan_of(name, p, m), uniform(f, b))
            assert sim.makespan == pytest.approx((m + p - 1) * (f + b)), (name, p, m)
            # Every rank does m(F + B) and waits (p - 1)(F + B).
            assert sim.overall_bubble_over_ideal == pytest.approx((p - 1) / m), (name, p, m)
            assert sim.overall_bubble_over_total == pytest.approx((p - 1) / (m + p - 1)), (name, p, m)


@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_makespan_closed_form(v):
    f, b = 1.0, 2.0
    for p in range(1, 5):
        for m in range(p, 13, p):  # m a multiple of p
            sim = simulate(plan_of("interleaved-1f1b", p, m, v), uniform(f / v, b / v))
            expected = m * (f + b) + (p - 1) * (f + b) / v
            assert sim.makespan == pytest.approx(expected), (v, p, m)
            assert sim.overall_bubble_over_ideal == pytest.approx((p - 1) / (v * m)), (v, p, m)


def test_peak_inflight_1f1b_and_gpipe():
    for p in range(1, 5):
        for m in range(1, 13):
            assert simulate(plan_of("1f1b", p, m), uniform(1, 2)).peak_inflight == [
                min(m, p - r) for r in range(p)
            ]
            assert simulate(plan_of("gpipe", p, m), uniform(1, 2)).peak_inflight == [m] * p


def test_peak_inflight_counts_every_stage_of_a_rank():
    # One rank holding stages 0 and 1 forwards both for two micro-batches: 4 sets in flight.
    plan = [[F(0, 0), F(1, 0), F(0, 1), F(1, 1), B(1, 1), B(0, 1), B(1, 0), B(0, 0)]]
    assert simulate(plan, uniform(1, 1)).peak_inflight == [4]


# ------------------------------------------------------------------ cost shapes


def test_dict_and_callable_costs_agree():
    def cost(kind, stage):
        return (1.0 + stage) * (1.0 if kind == "F" else 2.5)

    plan = plan_of("interleaved-1f1b", 2, 4, 2)
    table = {(kind, stage): cost(kind, stage) for kind in "FB" for stage in range(4)}
    by_call = simulate(plan, cost, comm=0.1)
    by_dict = simulate(plan, table, comm=0.1)
    assert by_dict.makespan == by_call.makespan
    assert by_dict.start == by_call.start


def test_records_costs_use_each_actions_own_duration():
    # Measured durations (absolute times are arbitrary: only durations matter):
    #   F0.0=1 F0.1=2 F1.0=3 F1.1=1 B1.1=2 B1.0=1 B0.1=1 B0.0=2, GPipe p=2 m=2.
    # rank 0: F0.0 [0,1]  F0.1 [1,3]                        B0.1 [7,8]  B0.0 [8,10]
    # rank 1:             F1.0 [1,4]  F1.1 [4,5]  B1.1 [5,7]  B1.0 [7,8]
    durations = {F(0, 0): 1, F(0, 1): 2, F(1, 0): 3, F(1, 1): 1, B(1, 1): 2, B(1, 0): 1, B(0, 1): 1, B(0, 0): 2}
    records, clock = [], 1000.0
    for action, d in durations.items():  # laid end to end with gaps, as a slow runtime would
        records.append(TaskRecord(action.stage, action.stage, action.microbatch, action.kind, clock, clock + d))
        clock += d + 0.7
    sim = simulate(plan_of("gpipe", 2, 2), records)
    assert sim.makespan == pytest.approx(10.0)
    assert sim.end[F(1, 0)] == pytest.approx(4.0)
    assert sim.start[B(0, 1)] == pytest.approx(7.0)

    # B0.0 unrecorded: it costs the mean of stage 0's other backwards (B0.1 = 1) -> makespan 9.
    partial = [r for r in records if not (r.kind == "B" and r.stage == 0 and r.microbatch == 0)]
    assert simulate(plan_of("gpipe", 2, 2), partial).makespan == pytest.approx(9.0)

    # F0.0 recorded twice (two steps: 1 s and 3 s) costs their mean, 2 s: everything after shifts by 1.
    twice = records + [TaskRecord(0, 0, 0, "F", 5000.0, 5003.0)]
    assert simulate(plan_of("gpipe", 2, 2), twice).makespan == pytest.approx(11.0)


def test_cost_errors_name_the_fix():
    plan = plan_of("gpipe", 2, 1)
    with pytest.raises(ValueError, match=r"no entry for \('B', 1\)"):
        simulate(plan, {("F", 0): 1.0, ("F", 1): 1.0, ("B", 0): 1.0})
    with pytest.raises(ValueError, match="finite number >= 0"):
        simulate(plan, uniform(1.0, -1.0))
    with pytest.raises(ValueError, match="nor any other B of stage 1"):
        simulate(plan, [TaskRecord(0, 0, 0, "F", 0, 1), TaskRecord(1, 1, 0, "F", 1, 2), TaskRecord(0, 0, 0, "B", 3, 4)])
    with pytest.raises(ValueError, match="empty list of task records"):
        simulate(plan, [])
    with pytest.raises(ValueError, match="costs must be a callable"):
        simulate(plan, 3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="comm must be"):
        simulate(plan, uniform(1, 1), comm=-1)


def test_plan_errors():
    with pytest.raises(IncompletePlan, match="B0.0 on rank 0 needs B1.0"):
        simulate([[F(0, 0), B(0, 0)], [F(1, 0)]], uniform(1, 1))
    with pytest.raises(ValueError, match="appears twice"):
        simulate([[F(0, 0), F(0, 0)]], uniform(1, 1))
    with pytest.raises(ValueError, match="expected Action"):
        simulate([["F0.0"]], uniform(1, 1))  # type: ignore[list-item]
    with pytest.raises(ValueError, match="num_stages must be"):
        simulate([[F(0, 0), F(1, 0)]], uniform(1, 1), num_stages=1)
    # Rank 1 runs B1.0 before F1.0, which B1.0 needs: it waits for itself.
    with pytest.raises(Deadlock):
        simulate([[F(0, 0), B(0, 0)], [B(1, 0), F(1, 0)]], uniform(1, 1))


def test_forward_only_and_empty_plans():
    forward = [[F(0, 0), F(0, 1)], [F(1, 0), F(1, 1)]]
    sim = simulate(forward, uniform(1.0, 2.0))
    assert sim.makespan == 3.0
    assert sim.peak_inflight == [2, 2]
    empty = simulate([[], []], uniform(1, 1))
    assert empty.makespan == 0.0 and empty.busy == [0.0, 0.0] and empty.critical_path == []


def test_records_round_trip_through_sim_records():
    sim = simulate(plan_of("1f1b", 3, 4), uniform(1.0, 2.0))
    again = simulate(plan_of("1f1b", 3, 4), sim.records())
    assert again.makespan == sim.makespan == 18.0


# ------------------------------------------------------------------ lower bound


def test_lower_bound_by_hand():
    # GPipe p=2, m=3, F=1, B=2: work = 3 x 3 = 9 per rank; chain = 2 x 3 + 2 hops x 0.5 = 7.
    bound = lower_bound(plan_of("gpipe", 2, 3), uniform(1.0, 2.0), comm=0.5)
    assert isinstance(bound, LowerBound)
    assert bound.work == 9.0 and bound.chain == 7.0 and bound.value == 9.0
    # m=1: the chain (6 + 1 = 7) dominates the work (3).
    bound = lower_bound(plan_of("gpipe", 2, 1), uniform(1.0, 2.0), comm=0.5)
    assert (bound.work, bound.chain, bound.value) == (3.0, 7.0, 7.0)
    assert float(bound) == 7.0
    assert bound.efficiency(simulate(plan_of("gpipe", 2, 1), uniform(1.0, 2.0), comm=0.5).makespan) == 1.0


def test_lower_bound_picks_the_busiest_rank_and_longest_chain():
    costs = {("F", 0): 1.0, ("B", 0): 1.0, ("F", 1): 4.0, ("B", 1): 4.0}
    records = [TaskRecord(0, 0, 0, "F", 0, 1), TaskRecord(0, 0, 1, "F", 0, 5)]  # mb 1 is slow on stage 0
    bound = lower_bound(plan_of("1f1b", 2, 2), costs)
    assert (bound.work, bound.work_rank) == (16.0, 1)
    recorded = lower_bound([[F(0, 0), F(0, 1)]], records)
    assert (recorded.chain, recorded.chain_microbatch) == (5.0, 1)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["gpipe", "1f1b", "interleaved-1f1b"]),
    p=st.integers(1, 4),
    m=st.integers(1, 8),
    seed_costs=st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=16, max_size=16),
    comm=st.floats(0.0, 2.0, allow_nan=False),
)
def test_lower_bound_never_exceeds_makespan(name, p, m, seed_costs, comm):
    if name == "interleaved-1f1b" and m % p:
        m = p * max(1, m // p)
    plan = plan_of(name, p, m, v=2)
    num_stages = 1 + max(a.stage for row in plan for a in row)
    costs = {
        (kind, stage): seed_costs[(2 * stage + (kind == "B")) % len(seed_costs)]
        for kind in "FB"
        for stage in range(num_stages)
    }
    sim = simulate(plan, costs, comm=comm)
    bound = lower_bound(plan, costs, comm=comm)
    assert bound.value <= sim.makespan * (1 + 1e-9) + 1e-9
    assert math.isclose(bound.value, max(bound.work, bound.chain))
    assert 0.0 <= bound.efficiency(sim.makespan) <= 1.0 + 1e-9
