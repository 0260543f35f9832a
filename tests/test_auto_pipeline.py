"""``Pipeline(schedule="auto")``: a warm-up step measures, later steps run the synthesised plan, exactly.

Gradients are checked against the un-pipelined model in float64 on every
step (warm-up, first synthesised, a repeat, and after the micro-batch count
changes). What ran is read back from the step report's task records, so
"the synthesised plan ran" is observed, not assumed. The hook itself is
generic: a schedule of any name that ``wants_costs`` is fed the medians.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Pipeline, Schedule, get_schedule


def batch(rows: int = 16):
    g = torch.Generator().manual_seed(5)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (rows,), generator=g)


def ran(report) -> list[list[str]]:
    """Per rank, the actions of the step in the order they ran."""
    rows: list[list[tuple[float, str]]] = [[] for _ in range(report.num_ranks)]
    for t in report.tasks:
        rows[t.rank].append((t.start, f"{t.kind}{t.stage}.{t.microbatch}"))
    return [[name for _, name in sorted(row)] for row in rows]


def exact_step(pipe, model, x, y):
    model.zero_grad(set_to_none=True)
    ref_loss, ref = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    loss = pipe.step(x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref)
    return pipe.last_report


def test_auto_warms_up_then_runs_the_plan_synthesised_from_measured_costs_with_exact_gradients():
    model = mlp(layers=8)
    x, y = batch(16)
    with Pipeline(model, schedule="auto", balance=[2, 2, 2, 2], devices=["cpu"] * 4, chunks=8,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        schedule = pipe.schedule
        first = exact_step(pipe, model, x, y)
        assert first.schedule == "auto" and "warm-up" in first.plan
        warm = get_schedule("1f1b").plan(4, 8, 4)
        assert [[a for a in row if a[0] != "W"] for row in ran(first)] == [[str(a) for a in row] for row in warm]
        assert schedule.measured is not None  # the runner fed the warm-up's medians

        second = exact_step(pipe, model, x, y)
        assert "synthesised for measured costs" in second.plan
        assert ran(second) == [[str(a) for a in row] for row in schedule.synthesis[8].plan]

        third = exact_step(pipe, model, x, y)
        assert third.plan == second.plan and ran(third) == ran(second)  # kept, not re-planned per step

        fewer = exact_step(pipe, model, x[:5], y[:5])  # 5 rows: 5 micro-batches, a new count
        assert fewer.num_microbatches == 5 and "synthesised for measured costs" in fewer.plan
        assert ran(fewer) == [[str(a) for a in row] for row in schedule.synthesis[5].plan]


def test_auto_with_looped_placement_runs_exactly():
    model = mlp(layers=8)
    x, y = batch(12)
    schedule = get_schedule("auto", placement="looped")
    with Pipeline(model, schedule=schedule, devices=["cpu"] * 2, chunks=4, loss_fn=nn.CrossEntropyLoss()) as pipe:
        assert pipe.num_stages == 4 and pipe.placement == [0, 1, 0, 1]
        assert "warm-up" in exact_step(pipe, model, x, y).plan
        assert "synthesised" in exact_step(pipe, model, x, y).plan


def test_auto_given_costs_plans_for_them_from_the_first_step():
    model = mlp(layers=8)
    x, y = batch(16)
    costs = {(k, s): 1.0 for k in "FBW" for s in range(4)}
    costs[("B", 3)] = 3.0
    schedule = get_schedule("auto", costs=costs, memory_limit=[4, 3, 2, 1])
    with Pipeline(model, schedule=schedule, balance=[2, 2, 2, 2], devices=["cpu"] * 4, chunks=8,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        report = exact_step(pipe, model, x, y)
        assert "synthesised for given costs" in report.plan
        assert report.peak_inflight[0] <= 4 and report.peak_inflight[3] <= 1  # the cap, measured by the engine
        exact_step(pipe, model, x, y)
        assert schedule.measured is None  # given costs are final: nothing fed


class Learner(Schedule):
    """A schedule of another name that wants measured costs: the hook is not about "auto"."""

    name = "learner"
    wants_costs = True

    def __init__(self):
        self.fed: list[dict] = []
        self.planned = 0

    def plan(self, num_stages, num_microbatches, num_ranks):
        self.planned += 1
        return get_schedule("1f1b").plan(num_stages, num_microbatches, num_ranks)

    def use_costs(self, costs, comm=0.0):
        self.fed.append(dict(costs))
        return len(self.fed) == 1  # stale once, after the first step

    def describe_plan(self, num_microbatches):
        return f"learner plan #{self.planned}"


def test_the_runner_feeds_any_schedule_that_wants_costs_the_median_task_times():
    model = mlp(layers=6)
    x, y = batch(12)
    learner = Learner()
    with Pipeline(model, schedule=learner, balance=[2, 2, 2], devices=["cpu"] * 3, chunks=4,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
        report = pipe.last_report
        assert report.plan == "learner plan #1"
        by_key: dict = {}
        for t in report.tasks:
            by_key.setdefault((t.kind, t.stage), []).append(t.end - t.start)
        assert learner.fed == [{key: statistics.median(v) for key, v in by_key.items()}]
        assert set(learner.fed[0]) == {(k, s) for k in "FB" for s in range(3)}
        pipe.step(x, y)
        assert learner.planned == 2 and pipe.last_report.plan == "learner plan #2"  # re-planned once
        pipe.step(x, y)
        with torch.no_grad():
            pipe(x)  # forward only: no costs fed
        assert learner.planned == 2 and len(learner.fed) == 3
