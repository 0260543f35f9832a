"""``"auto"``: a plan synthesised for given costs, never slower in simulation than the built-ins.

The yardsticks are computed here, independently of the synthesiser: each
built-in of the placement is built as a user would build it for the same
costs (``get_schedule(name, costs=..., comm=...)`` where it takes them),
simulated by :func:`pipesched.simulate`, and its in-flight memory counted by
:func:`held_peak` below (a set of held pairs walked along the rank's order),
not by the synthesiser's own bookkeeping.
"""

from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipesched import Action, get_schedule, simulate, validate_plan
from pipesched.plan.costs import median_costs
from pipesched.plan.record import TaskRecord
from pipesched.plan.synthesis import synthesise

BUILT_INS = {
    "contiguous": ("gpipe", "1f1b", "zb-h1"),
    "looped": ("looped-bfs", "interleaved-1f1b", "interleaved-zb"),
    "v": ("zb-v", "dualpipe-v"),
}


def shape(placement: str, p: int, v: int = 2) -> tuple[int, list[int]]:
    if placement == "contiguous":
        return p, list(range(p))
    if placement == "looped":
        return v * p, [s % p for s in range(v * p)]
    return 2 * p, [s if s < p else 2 * p - 1 - s for s in range(2 * p)]


def held_peak(row, weight=lambda stage: 1) -> float:
    """Most weight one rank's order holds: a pair from its F until its W (or its B when it has no W)."""
    has_w = {(a.stage, a.microbatch) for a in row if a.kind == "W"}
    held: set[tuple[int, int]] = set()
    peak = 0
    for a in row:
        pair = (a.stage, a.microbatch)
        if a.kind == "F":
            held.add(pair)
        elif a.kind == "W" or pair not in has_w:
            held.discard(pair)
        peak = max(peak, sum(weight(s) for s, _ in held))
    return peak


def best_built_in(placement, p, m, costs, comm, cap, v=2, weight=lambda stage: 1):
    """(makespan, name) of the fastest built-in of ``placement`` that fits ``cap``, or None."""
    stages, _ = shape(placement, p, v)
    best = None
    for name in BUILT_INS[placement]:
        options = {"virtual_stages": v} if placement == "looped" else {}
        try:
            schedule = get_schedule(name, costs=costs, comm=comm, **options)
        except TypeError:
            schedule = get_schedule(name, **options)
        try:
            plan = schedule.plan(stages, m, p)
            makespan = simulate(plan, costs, comm=comm).makespan
        except ValueError:
            continue
        caps = cap if isinstance(cap, (list, tuple)) else [cap] * p
        if cap is not None and any(held_peak(row, weight) > c for row, c in zip(plan, caps)):
            continue
        if best is None or makespan < best[0]:
            best = (makespan, name)
    return best


def auto_plan(placement, p, m, costs, comm=0.0, cap=None, v=2):
    stages, place = shape(placement, p, v)
    schedule = get_schedule("auto", costs=costs, comm=comm, memory_limit=cap, placement=placement, virtual_stages=v)
    assert schedule.default_num_stages(p) == stages
    assert schedule.placement(stages, p) == place
    plan = schedule.plan(stages, m, p)
    validate_plan(plan, stages, m, p, place)
    return schedule, plan


def table(stages, f=1.0, b=1.0, w=1.0, **overrides):
    costs = {(kind, s): value for s in range(stages) for kind, value in (("F", f), ("B", b), ("W", w))}
    costs.update(overrides.get("extra", {}))
    return costs


# ------------------------------------------------------------ never worse


@st.composite
def cost_models(draw):
    placement = draw(st.sampled_from(sorted(BUILT_INS)))
    p = draw(st.integers(1 if placement == "contiguous" else 2, 5))
    m = draw(st.integers(1, 10))
    stages, _ = shape(placement, p)
    level = st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])
    costs = {}
    for s in range(stages):
        costs[("F", s)] = draw(level)
        costs[("B", s)] = draw(level)
        costs[("W", s)] = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    comm = draw(st.sampled_from([0.0, 0.0, 0.25, 1.0]))
    cap = draw(st.sampled_from([None, None, p, p + 1, 2 * p, [p - r for r in range(p)]]))
    if placement != "contiguous" and isinstance(cap, list):
        cap = [2 * c for c in cap]
    return placement, p, m, costs, comm, cap


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cost_models())
def test_auto_is_never_worse_than_the_best_built_in_that_fits(model):
    placement, p, m, costs, comm, cap = model
    _, plan = auto_plan(placement, p, m, costs, comm, cap)
    makespan = simulate(plan, costs, comm=comm).makespan
    caps = cap if isinstance(cap, list) else [cap] * p
    if cap is not None:
        assert all(held_peak(row) <= c for row, c in zip(plan, caps)), (
            [held_peak(row) for row in plan], caps)
    best = best_built_in(placement, p, m, costs, comm, cap)
    if best is not None:
        assert makespan <= best[0] * (1 + 1e-9), (makespan, best)


GRID = [
    (p, m, name)
    for p in (4, 8) for m in (8, 16, 32)
    for name in ("equal", "heavy-first", "heavy-last", "W=B/2", "comm")
]


def named_costs(name: str, stages: int) -> tuple[dict, float]:
    if name == "equal":
        return table(stages), 0.0
    if name == "heavy-first":
        return table(stages, extra={("F", 0): 2.0, ("B", 0): 2.0}), 0.0
    if name == "heavy-last":
        return table(stages, extra={("F", stages - 1): 1.5, ("B", stages - 1): 3.0}), 0.0
    if name == "W=B/2":
        return table(stages, w=0.5), 0.0
    return table(stages), 0.3


@pytest.mark.parametrize("cap", ["none", "p", "1f1b"])
def test_auto_is_never_worse_on_the_benchmark_grid(cap):
    """The auto table's grid (docs/guide/auto-and-tune.md), contiguous placement: every cell at most the best built-in."""
    for p, m, name in GRID:
        if m == 32 and p == 8 and cap != "none":
            continue  # the largest cells only once, to keep the suite fast
        costs, comm = named_costs(name, p)
        limit = {"none": None, "p": p, "1f1b": [p - r for r in range(p)]}[cap]
        _, plan = auto_plan("contiguous", p, m, costs, comm, limit)
        best = best_built_in("contiguous", p, m, costs, comm, limit)
        assert simulate(plan, costs, comm=comm).makespan <= best[0] * (1 + 1e-9), (p, m, name, cap)


# -------------------------------------------------------- strictly better


STRICT = [
    # (placement, p, m, cost model, cap, built-in it must beat, by at least)
    ("contiguous", 4, 8, "W=B/2", None, "zb-h1", 0.05),
    ("contiguous", 8, 16, "comm", None, "zb-h1", 0.08),
    ("contiguous", 4, 16, "heavy-last", "1f1b", "1f1b", 0.03),
    ("contiguous", 8, 8, "heavy-first", "1f1b", "1f1b", 0.1),
    ("contiguous", 8, 16, "W=B/2", "1f1b", "1f1b", 0.03),
    ("looped", 4, 8, "heavy-first", None, "interleaved-1f1b", 0.01),
    ("looped", 4, 16, "comm", None, "interleaved-zb", 0.03),
    ("v", 4, 8, "comm", None, "zb-v", 0.05),
]


@pytest.mark.parametrize("placement, p, m, model, cap, rival, margin", STRICT)
def test_auto_beats_the_built_ins_where_costs_are_unequal(placement, p, m, model, cap, rival, margin):
    stages, _ = shape(placement, p)
    costs, comm = named_costs(model, stages)
    limit = [p - r for r in range(p)] if cap == "1f1b" else None
    _, plan = auto_plan(placement, p, m, costs, comm, limit)
    makespan = simulate(plan, costs, comm=comm).makespan
    best = best_built_in(placement, p, m, costs, comm, limit)
    assert best[1] == rival
    assert makespan <= best[0] * (1 - margin), (makespan, best)
    if limit is not None:
        assert all(held_peak(row) <= c for row, c in zip(plan, limit))


def test_a_memory_cap_no_built_in_fits_still_gets_a_plan_within_it():
    p, m = 4, 8
    costs = table(p)
    assert best_built_in("contiguous", p, m, costs, 0.0, 2) is None  # 1F1B's rank 0 holds 4
    schedule, plan = auto_plan("contiguous", p, m, costs, 0.0, 2)
    assert max(held_peak(row) for row in plan) <= 2
    assert schedule.synthesis[m].baseline is None
    assert "no built-in fits" in schedule.describe_plan(m)


def test_memory_limit_in_bytes_when_costs_carry_bytes():
    """Stage 0 keeps 4x the bytes of the others: the cap binds there, and is checked in bytes."""
    p, m = 4, 12
    weights = {0: 400.0, 1: 100.0, 2: 100.0, 3: 100.0}
    costs = table(p, w=0.5, extra={("bytes", s): b for s, b in weights.items()})
    cap = 1200.0
    _, plan = auto_plan("contiguous", p, m, costs, 0.0, cap)
    assert max(held_peak(row, weights.__getitem__) for row in plan) <= cap
    best = best_built_in("contiguous", p, m, costs, 0.0, cap, weight=weights.__getitem__)
    if best is not None:
        assert simulate(plan, costs).makespan <= best[0] * (1 + 1e-9)
    # the same limit read as micro-batches would be no cap at all: a different answer
    loose = get_schedule("auto", costs={k: v for k, v in costs.items() if k[0] != "bytes"}, memory_limit=cap)
    assert max(held_peak(row) for row in loose.plan(p, m, p)) * 400 > cap


def test_costs_without_weight_passes_give_unsplit_backwards():
    p, m = 4, 8
    costs = {(k, s): 1.0 for k in "FB" for s in range(p)}
    costs[("F", 3)] = 2.0
    _, plan = auto_plan("contiguous", p, m, costs)
    assert not any(a.kind == "W" for row in plan for a in row)
    assert simulate(plan, costs).makespan <= best_built_in("contiguous", p, m, costs, 0.0, None)[0]


def test_synthesis_is_deterministic_and_callable_costs_work():
    costs = table(4, w=0.5, extra={("F", 3): 2.0})
    first = auto_plan("contiguous", 4, 10, costs, 0.2)[1]
    assert auto_plan("contiguous", 4, 10, costs, 0.2)[1] == first
    _, plan = auto_plan("contiguous", 4, 10, lambda kind, stage: costs[(kind, stage)], 0.2)
    validate_plan(plan, 4, 10, 4, list(range(4)))


def test_the_largest_shape_plans_within_its_cap():
    """p = 8, m = 64 with unequal costs and a cap plans and validates (how long it takes is
    reported by benchmark 12, not asserted here: no timed assertions in unit tests)."""
    costs, comm = named_costs("comm", 8)
    _, plan = auto_plan("contiguous", 8, 64, costs, comm, 12)
    validate_plan(plan, 8, 64, 8, list(range(8)))


# ------------------------------------------------------- without costs


def test_without_costs_auto_runs_the_warm_up_1f1b_order_splitting_every_other_backward():
    schedule = get_schedule("auto")
    assert schedule.wants_costs
    plan = schedule.plan(4, 6, 4)
    onefonb = get_schedule("1f1b").plan(4, 6, 4)
    assert [[a for a in row if a.kind != "W"] for row in plan] == onefonb
    for row in plan:  # odd micro-batches split, each W right after its B (1F1B's memory); even ones whole
        for i, a in enumerate(row):
            if a.kind == "B" and a.microbatch % 2:
                assert row[i + 1] == Action("W", a.stage, a.microbatch)
            elif a.kind == "B":
                assert i + 1 == len(row) or row[i + 1].kind != "W"
    assert "warm-up" in schedule.describe_plan(6)


def test_use_costs_makes_the_warm_up_stale_once_then_synthesises():
    schedule = get_schedule("auto")
    schedule.plan(4, 8, 4)
    measured = table(4, w=0.5, extra={("B", 3): 3.0})
    assert schedule.use_costs(measured) is True
    assert schedule.use_costs(measured) is False  # later measurements: kept for new counts only
    plan = schedule.plan(4, 8, 4)
    assert "synthesised for measured costs" in schedule.describe_plan(8)
    best = best_built_in("contiguous", 4, 8, measured, 0.0, None)
    assert simulate(plan, measured).makespan <= best[0]
    assert schedule.use_costs({("F", 0): 1.0}) is False  # incomplete: ignored
    given = get_schedule("auto", costs=measured)
    assert not given.wants_costs and given.use_costs(table(4)) is False


def test_a_low_cap_warms_up_within_it():
    schedule = get_schedule("auto", memory_limit=2)
    plan = schedule.plan(4, 8, 4)
    assert max(held_peak(row) for row in plan) <= 2


def test_median_costs_tells_split_from_whole_backwards():
    rows = [TaskRecord(0, 0, mb, "F", 0.0, 1.0 + mb) for mb in range(3)]
    rows += [TaskRecord(0, 0, mb, "B", 0.0, 2.0) for mb in range(3)] + [TaskRecord(0, 0, mb, "W", 0.0, 0.5) for mb in range(3)]
    rows += [TaskRecord(1, 1, 0, "F", 0.0, 1.0), TaskRecord(1, 1, 0, "B", 0.0, 4.0)]
    assert median_costs(rows) == {("B", 0): 2.0, ("B", 1): 4.0, ("F", 0): 2.0, ("F", 1): 1.0, ("W", 0): 0.5}


# -------------------------------------------------------------- errors


@pytest.mark.parametrize("options, message", [
    ({"placement": "ring"}, "placement must be one of"),
    ({"memory_limit": 0}, "memory_limit must be None"),
    ({"memory_limit": "2GiB"}, "memory_limit must be None"),
    ({"virtual_stages": 1}, "virtual_stages"),
    ({"costs": "fast"}, "costs must be a dict"),
    ({"comm": -1}, "comm must be"),
])
def test_bad_options_are_refused_with_the_argument_named(options, message):
    with pytest.raises(ValueError, match=message):
        get_schedule("auto", **options)


def test_bad_shapes_and_costs_are_refused_at_plan_time():
    with pytest.raises(ValueError, match="exactly one stage per rank"):
        get_schedule("auto", costs=table(4)).plan(4, 4, 2)
    with pytest.raises(ValueError, match="multiple >= 2"):
        get_schedule("auto", placement="looped").plan(3, 4, 2)
    with pytest.raises(ValueError, match=r"no entry for \('B', 3\)"):
        get_schedule("auto", costs={k: v for k, v in table(4).items() if k != ("B", 3)}).plan(4, 4, 4)
    with pytest.raises(ValueError, match="bytes"):
        get_schedule("auto", costs=table(4, extra={("bytes", 0): 10})).plan(4, 4, 4)
    with pytest.raises(ValueError, match="at least 2 per rank"):
        synthesise([0, 1, 1, 0], 4, table(4), memory_limit=1)
    with pytest.raises(ValueError, match="one per rank"):
        get_schedule("auto", costs=table(4), memory_limit=[4, 4]).plan(4, 4, 4)
