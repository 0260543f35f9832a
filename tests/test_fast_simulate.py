"""The array-based simulator and validator against the reference (dict-based) ones, on many small plans.

The fast path is the default only because it answers exactly what the
reference answers: the same start and end of every action (compared with
``==``, not approximately), the same summaries and critical path, the same
verdict and the same error words on broken plans, deadlocks included. Both
engines of :mod:`pipesched.plan.fast_replay` (numpy waves and the integer
loop) are held to it, whatever the number of ranks.
"""

from __future__ import annotations

import copy
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesched import Action, Deadlock, TaskRecord, get_schedule
from pipesched.plan.fast_replay import replay_arrays
from pipesched.plan.fast_simulate import CheckedPlan, simulate_fast, validate_plan_fast
from pipesched.plan.lowering import SkipEdge, check_skips
from pipesched.plan.plan_arrays import ActionTable, NotFast, PlanArrays
from pipesched.plan.schedule import validate_actions_reference, validate_plan
from pipesched.plan.simulate import simulate, simulate_reference

# (schedule, options, stages per rank): every placement and kind mix the built-ins make
SCHEDULES = [
    ("gpipe", {}, 1),
    ("1f1b", {}, 1),
    ("zb-h1", {}, 1),
    ("interleaved-1f1b", {"virtual_stages": 2}, 2),
    ("interleaved-1f1b", {"virtual_stages": 3}, 3),
    ("looped-bfs", {"virtual_stages": 2}, 2),
    ("interleaved-zb", {"virtual_stages": 2}, 2),
    ("zb-v", {}, 2),
    ("dualpipe-v", {}, 2),
]
ENGINES = ("waves", "loop")


def built(index: int, p: int, m: int) -> tuple[list[list[Action]], list[int], int]:
    name, options, v = SCHEDULES[index]
    schedule = get_schedule(name, **options)
    stages = v * p
    return schedule.plan(stages, m, p), schedule.placement(stages, p), stages


def cost_table(rng: random.Random, stages: int, with_w: bool) -> dict[tuple[str, int], float]:
    """Random seconds per (kind, stage): small integers (many ties), fractions, and zeros."""
    def draw() -> float:
        return rng.choice([0.0, 1.0, 2.0, 3.0, rng.random(), rng.uniform(0.0, 5.0)])

    kinds = "FBW" if with_w else "FB"
    return {(kind, s): draw() for kind in kinds for s in range(stages)}


def assert_same_run(fast, reference) -> None:
    assert fast.makespan == reference.makespan
    assert dict(fast.start) == dict(reference.start)
    assert dict(fast.end) == dict(reference.end)
    assert dict(fast.rank_of) == dict(reference.rank_of)
    for field in ("busy", "idle", "bubble_over_total", "bubble_over_ideal", "overall_bubble_over_total",
                  "overall_bubble_over_ideal", "peak_inflight", "critical_path", "num_stages"):
        assert getattr(fast, field) == getattr(reference, field), field
    assert fast.records() == reference.records()


def outcome(function, *args, **kwargs):
    """What a call returns, or the type, words and stuck actions of what it raises."""
    try:
        return ("ok", function(*args, **kwargs))
    except (ValueError, KeyError, NotFast) as error:
        return ("raised", type(error), str(error), getattr(error, "waiting", None))


# ------------------------------------------------------------ same times


@settings(max_examples=60, deadline=None)
@given(
    index=st.integers(0, len(SCHEDULES) - 1),
    p=st.integers(1, 5),
    m=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
    comm=st.sampled_from([0.0, 0.5, 1.0, 0.3]),
)
def test_built_in_plans_run_the_same_on_both_engines_as_on_the_reference(index, p, m, seed, comm):
    try:
        plan, placement, stages = built(index, p, m)
    except ValueError:  # a shape this schedule refuses (e.g. too few micro-batches)
        return
    rng = random.Random(seed)
    costs = cost_table(rng, stages, with_w=rng.random() < 0.7)
    reference = outcome(simulate_reference, plan, costs, comm=comm, num_stages=stages)
    for engine in ENGINES:
        fast = outcome(simulate_fast, plan, costs, comm, stages, (), engine)
        if reference[0] == "raised":  # costs without W for a plan that splits: the fast path declines
            assert fast[0] == "raised" and fast[1] is NotFast
            assert outcome(simulate, plan, costs, comm=comm, num_stages=stages) == reference
        else:
            assert_same_run(fast[1], reference[1])
    checked = validate_plan(plan, stages, m, p, placement)
    assert isinstance(checked, CheckedPlan) and checked == plan


@settings(max_examples=40, deadline=None)
@given(p=st.integers(2, 5), m=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_split_backwards_and_skip_connections_run_the_same_as_on_the_reference(p, m, seed):
    """Some backwards split (a W), some whole; skip edges between random stage pairs."""
    rng = random.Random(seed)
    plan = get_schedule("1f1b").plan(p, m, p)
    plan = [[a for action in row for a in ([action, Action("W", action.stage, action.microbatch)]
                                           if action.kind == "B" and rng.random() < 0.5 else [action])]
            for row in plan]
    pairs = sorted({tuple(sorted(rng.sample(range(p), 2))) for _ in range(rng.randint(0, 3))})
    skips = tuple(SkipEdge(a, b, ("x",)) for a, b in pairs)
    costs = cost_table(rng, p, with_w=True)
    comm = rng.choice([0.0, 0.25, 2.0])
    reference = simulate_reference(plan, costs, comm=comm, skips=skips)
    for engine in ENGINES:
        assert_same_run(simulate_fast(plan, costs, comm, None, skips, engine), reference)


def test_callable_and_measured_costs_price_the_same_as_on_the_reference():
    plan = get_schedule("zb-h1").plan(3, 5, 3)
    reference = simulate_reference(plan, lambda kind, stage: 1.0 + stage + (kind == "B"))
    assert_same_run(simulate(plan, lambda kind, stage: 1.0 + stage + (kind == "B")), reference)
    rng = random.Random(0)
    records, clock = [], 0.0
    for r, row in enumerate(plan):
        for a in row:
            took = rng.uniform(0.5, 2.0)
            records.append(TaskRecord(r, a.stage, a.microbatch, a.kind, clock, clock + took))
            clock += took
    assert_same_run(simulate(plan, iter(records)), simulate_reference(plan, records))


# ------------------------------------------------------- same verdicts


def shuffled(plan: list[list[Action]], rng: random.Random, swaps: int) -> list[list[Action]]:
    """``plan`` with some actions swapped within their rank: often a deadlock, sometimes a B before its F."""
    rows = [list(row) for row in plan]
    for _ in range(swaps):
        row = rng.choice(rows)
        if len(row) > 1:
            i, j = rng.sample(range(len(row)), 2)
            row[i], row[j] = row[j], row[i]
    return rows


@settings(max_examples=80, deadline=None)
@given(
    index=st.integers(0, len(SCHEDULES) - 1),
    p=st.integers(1, 4),
    m=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    swaps=st.integers(1, 4),
)
def test_broken_orders_get_the_same_verdict_and_words_as_from_the_reference(index, p, m, seed, swaps):
    try:
        plan, placement, stages = built(index, p, m)
    except ValueError:
        return
    rng = random.Random(seed)
    broken = shuffled(plan, rng, swaps)
    if rng.random() < 0.3 and any(broken):  # and sometimes a missing or doubled action
        row = rng.choice([r for r in broken if r])
        row.pop(rng.randrange(len(row))) if rng.random() < 0.5 else row.append(row[0])
    reference = outcome(validate_actions_reference, broken, stages, m, placement, "FBW", ())
    assert outcome(validate_plan, broken, stages, m, p, placement) == reference
    costs = cost_table(rng, stages, with_w=True)
    expected = outcome(simulate_reference, broken, costs, num_stages=stages)
    got = outcome(simulate, broken, costs, num_stages=stages)
    if expected[0] == "ok":
        assert_same_run(got[1], expected[1])
    else:
        assert got == expected


@pytest.mark.parametrize("engine", ENGINES)
def test_a_deadlock_names_the_same_waiting_actions_on_both_engines(engine):
    # rank 0 runs B0.0 before F0.1; B0.0 needs B1.0, which needs F1.1 from... F0.1: a cycle
    plan = get_schedule("1f1b").plan(2, 2, 2)
    broken = [[Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)],
              [Action("F", 1, 0), Action("F", 1, 1), Action("B", 1, 0), Action("B", 1, 1)]]
    assert broken != plan
    arrays = PlanArrays(broken, 2)
    deps, _ = arrays.dependencies()
    with pytest.raises(Deadlock) as fast:
        replay_arrays(arrays, deps, None, 0.0, (), engine)
    with pytest.raises(Deadlock) as reference:
        validate_actions_reference(broken, 2, 2, [0, 1], "FB", ())
    assert fast.value.waiting == reference.value.waiting
    assert str(fast.value) == str(reference.value)


# ------------------------------------------------------- checked plans


def test_simulate_after_editing_a_checked_plan_reads_the_plan_again():
    """A checked plan keeps its arrays; an edit after the check must not be simulated from them."""
    plan = validate_plan(get_schedule("1f1b").plan(2, 3, 2), 2, 3, 2, [0, 1])
    costs = {("F", 0): 1.0, ("F", 1): 1.0, ("B", 0): 2.0, ("B", 1): 2.0}
    before = simulate(plan, costs)
    plan[0][0], plan[0][1] = plan[0][1], plan[0][0]  # F0.1 before F0.0: later, not a deadlock
    after = simulate(plan, costs)
    assert_same_run(after, simulate_reference(plan, costs))
    assert after.makespan > before.makespan


def test_a_checked_plan_pickles_and_copies_as_a_plain_list():
    plan = validate_plan(get_schedule("gpipe").plan(2, 2, 2), 2, 2, 2, [0, 1])
    for clone in (pickle.loads(pickle.dumps(plan)), copy.copy(plan), copy.deepcopy(plan)):
        assert type(clone) is list and clone == plan


def test_the_action_table_reads_like_a_dict():
    plan = get_schedule("1f1b").plan(2, 2, 2)
    sim = simulate(plan, {("F", 0): 1.0, ("F", 1): 1.0, ("B", 0): 2.0, ("B", 1): 2.0})
    assert isinstance(sim.start, ActionTable)
    assert list(sim.start) == [a for row in plan for a in row] and len(sim.start) == 8
    assert Action("F", 1, 1) in sim.start and Action("F", 5, 0) not in sim.start and "F0.0" not in sim.start
    assert sim.start.get(Action("W", 0, 0), "none") == "none"
    assert type(sim.end[Action("B", 0, 0)]) is float and type(sim.rank_of[Action("B", 1, 1)]) is int
    with pytest.raises(KeyError):
        sim.end[Action("F", 0, 9)]


def test_arrays_decline_what_only_the_reference_can_word():
    with pytest.raises(NotFast):
        PlanArrays([[Action("F", 0, 0), Action("F", 0, 0)]], 1)  # an action twice
    with pytest.raises(NotFast):
        PlanArrays([[Action("F", 0, 0), "F0.1"]], 1)  # not an Action
    with pytest.raises(NotFast):
        PlanArrays([[Action("F", 0, 10**9)]], 1)  # a key space far larger than the plan
    with pytest.raises(NotFast):
        validate_plan_fast([[Action("B", 0, 0), Action("F", 0, 0)]], 1, 1, [0], "FB", check_skips((), 1))


@settings(max_examples=40, deadline=None)
@given(
    index=st.integers(0, len(SCHEDULES) - 1),
    p=st.integers(1, 5),
    m=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    comm=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_the_span_bound_on_arrays_is_the_reference_bound(index, p, m, seed, comm):
    from pipesched.plan.greedy import span_bound, span_bound_reference

    try:
        plan, _, stages = built(index, p, m)
    except ValueError:
        return
    costs = cost_table(random.Random(seed), stages, with_w=True)
    assert span_bound(plan, stages, costs, comm) == span_bound_reference(plan, stages, costs, comm)
