"""Every task shows up in torch.profiler as ``pipesched <action>`` (e.g. ``pipesched F1.3``), on its rank's thread."""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch._C._profiler import _ExperimentalConfig

from conftest import mlp
from pipesched import Pipeline


def _profiled_step(schedule: str, all_threads: bool):
    model = mlp(layers=6, width=8)
    x = torch.randn(8, 8, dtype=torch.float64)
    y = torch.zeros(8, 4, dtype=torch.float64)
    with Pipeline(model, schedule=schedule, balance=[2, 2, 2], devices=["cpu"] * 3, chunks=4,
                  checkpoint="never", loss_fn=nn.MSELoss()) as pipe:
        pipe.step(x, y)  # the workers exist before the profiler starts, as in a training loop
        config = _ExperimentalConfig(profile_all_threads=True) if all_threads else None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    experimental_config=config) as prof:
            pipe.step(x, y)
        plan = pipe.schedule.plan(3, 4, 3)
    return plan, [e for e in prof.events() if e.name.startswith("pipesched ")]


def test_every_action_of_a_step_is_a_labelled_range_on_a_worker_thread():
    plan, events = _profiled_step("1f1b", all_threads=True)
    expected = sorted(f"pipesched {action}" for row in plan for action in row)
    assert sorted(e.name for e in events) == expected
    caller = threading.get_native_id()
    threads = {e.name: e.thread for e in events}
    assert caller not in set(threads.values())
    # one thread per rank: every task of a rank on the same thread, ranks on different threads
    per_rank = [{threads[f"pipesched {a}"] for a in row} for row in plan]
    assert all(len(ids) == 1 for ids in per_rank)
    assert len(set.union(*per_rank)) == len(plan)


def test_a_labelled_range_holds_the_ops_its_task_ran():
    _, events = _profiled_step("gpipe", all_threads=True)
    forward = next(e for e in events if e.name == "pipesched F0.0")
    children = {c.name for c in forward.cpu_children}
    assert "aten::linear" in children or "aten::addmm" in children, children


def test_no_labels_without_a_profiler_and_the_step_still_runs():
    model = mlp(layers=6, width=8)
    with Pipeline(model, schedule="1f1b", balance=[2, 2, 2], devices=["cpu"] * 3, chunks=4,
                  checkpoint="never", loss_fn=nn.MSELoss()) as pipe:
        assert not torch.autograd.profiler._is_profiler_enabled
        loss = pipe.step(torch.randn(8, 8, dtype=torch.float64), torch.zeros(8, 4, dtype=torch.float64))
    assert torch.isfinite(loss)

