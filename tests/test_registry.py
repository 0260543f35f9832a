"""Schedules are plug-ins: found by entry point, registered at run time, validated before running."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Action, Deadlock, Pipeline, Schedule, get_schedule, list_schedules, register_schedule


@pytest.fixture(autouse=True)
def registry_left_as_found():
    """Schedules a test registers (some deliberately broken) leave with it.

    A leftover ``not-a-schedule`` used to break every later test that loops
    over ``list_schedules()``.
    """
    from pipesched.plan import registry

    saved = dict(registry._factories)
    yield
    registry._factories.clear()
    registry._factories.update(saved)


def test_builtins_come_from_the_entry_point_group():
    names = {ep.name for ep in entry_points(group="pipesched.schedules")}
    assert {"gpipe", "1f1b", "interleaved-1f1b", "interleaved"} <= names
    assert {"gpipe", "1f1b", "interleaved-1f1b", "interleaved"} <= set(list_schedules())
    assert type(get_schedule("Interleaved")) is type(get_schedule("interleaved-1f1b"))


class ForwardOrderGPipe(Schedule):
    """Fill-drain with backwards in forward order: a different valid plan."""

    name = "forward-order-gpipe"

    def plan(self, num_stages, num_microbatches, num_ranks):
        return [
            [Action("F", s, m) for m in range(num_microbatches)]
            + [Action("B", s, m) for m in range(num_microbatches)]
            for s in range(num_stages)
        ]


class Deadlocking(Schedule):
    """Rank 0 waits in B0.0 for rank 1, which waits in F1.1 for rank 0's F0.1."""

    def plan(self, num_stages, num_microbatches, num_ranks):
        return [
            [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)],
            [Action("F", 1, 1), Action("F", 1, 0), Action("B", 1, 0), Action("B", 1, 1)],
        ]


class BrokenForOneMicrobatch(ForwardOrderGPipe):
    """Valid for every count but 1, where it forgets the last stage's backward."""

    def plan(self, num_stages, num_microbatches, num_ranks):
        plan = super().plan(num_stages, num_microbatches, num_ranks)
        return plan if num_microbatches != 1 else [plan[0], plan[1][:-1]]


def test_registered_custom_schedule_runs_and_matches_reference():
    register_schedule("forward-order-gpipe", ForwardOrderGPipe, replace=True)
    assert "forward-order-gpipe" in list_schedules()
    model = mlp(layers=6)
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
    _, ref = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    with Pipeline(model, schedule="forward-order-gpipe", balance=[3, 3], chunks=4,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
        kinds = [(t.kind, t.microbatch) for t in pipe.last_report.tasks if t.rank == 0]
    assert kinds == [("F", m) for m in range(4)] + [("B", m) for m in range(4)]
    assert_grads_equal(model, ref)


def test_schedule_instance_is_accepted():
    with Pipeline(mlp(layers=6), schedule=ForwardOrderGPipe(), balance=[3, 3]) as pipe:
        assert pipe.schedule.name == "forward-order-gpipe"


def test_deadlocking_plan_is_refused_before_any_task_runs():
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x

    model = nn.Sequential(Spy(), nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(Deadlock, match=r"rank 0 at B0\.0 waits for B1\.0; rank 1 at F1\.1 waits for F0\.1") as info:
        Pipeline(model, schedule=Deadlocking(), balance=[2, 1], chunks=2, loss_fn=nn.MSELoss())
    assert "deadlock" in str(info.value)
    assert calls == []


def test_plan_checked_again_for_each_new_microbatch_count():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    pipe = Pipeline(model, schedule=BrokenForOneMicrobatch(), balance=[1, 1], chunks=2,
                    loss_fn=nn.MSELoss())
    with pipe:
        pipe.step(torch.randn(2, 8), torch.randn(2, 8))
        with pytest.raises(ValueError, match="missing 1 action"):
            pipe.step(torch.randn(1, 8), torch.randn(1, 8))  # one row: one micro-batch


def test_duplicate_names_need_replace():
    register_schedule("dup-test", ForwardOrderGPipe, replace=True)
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("dup-test", Deadlocking)
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("gpipe", Deadlocking)
    register_schedule("dup-test", Deadlocking, replace=True)
    assert isinstance(get_schedule("dup-test"), Deadlocking)


def test_factory_must_return_a_schedule():
    register_schedule("not-a-schedule", lambda: object(), replace=True)
    with pytest.raises(TypeError, match="expected a pipesched.Schedule"):
        get_schedule("not-a-schedule")


def test_bad_placement_is_refused():
    class Misplaced(ForwardOrderGPipe):
        def placement(self, num_stages, num_ranks):
            return [0] * (num_stages + 1)

    with pytest.raises(ValueError, match="one rank per stage"):
        Pipeline(mlp(layers=6), schedule=Misplaced(), balance=[3, 3])
