"""Engine behaviour: failures without hangs, threads, logging, event loops, caller state."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import threading

import pytest
import structlog
import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Pipeline


def run_bounded(fn, timeout: float = 30.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"call did not return within {timeout}s (hang)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


class FailOn(nn.Module):
    """Identity that raises ``error`` on the chosen micro-batch (identified by row count order)."""

    def __init__(self, error: BaseException, when: str, calls: int = 1):
        super().__init__()
        self.error, self.when, self.calls, self.seen = error, when, calls, 0
        self.armed = True

    def forward(self, x):
        if self.when == "forward" and self.armed:
            self.seen += 1
            if self.seen == self.calls:
                raise self.error
        if self.when == "backward" and self.armed:
            return _RaiseInBackward.apply(x, self.error)
        return x


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, error):
        ctx.error = error
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise ctx.error


def failing_model(when: str, position: int, calls: int = 1):
    model = mlp(layers=6)
    fail = FailOn(ValueError("injected"), when, calls)
    layers = list(model)
    layers.insert(position, fail)
    return nn.Sequential(*layers), fail


@pytest.mark.parametrize("schedule,balance", [("gpipe", [4, 3]), ("1f1b", [4, 3]),
                                              ("interleaved", [2, 2, 2, 1])])
@pytest.mark.parametrize("when", ["forward", "backward"])
@pytest.mark.parametrize("position", [1, 6])
def test_task_error_propagates_promptly_and_pipeline_recovers(schedule, balance, when, position):
    model, fail = failing_model(when, position, calls=2)
    x = torch.randn(8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    loss_fn = nn.CrossEntropyLoss()
    # checkpoint="never": a forward call is always a first run (a recompute runs inside B)
    with Pipeline(model, schedule=schedule, balance=balance, chunks=4, checkpoint="never",
                  loss_fn=loss_fn) as pipe:
        with pytest.raises(ValueError, match="injected") as info:
            run_bounded(lambda: pipe.step(x, y))
        notes = " ".join(getattr(info.value, "__notes__", []))
        kind = "forward" if when == "forward" else "backward"
        assert f"raised in {kind}" in notes and "micro-batch" in notes and "stage" in notes
        stage = next(s for s, st in enumerate(pipe.stages) if fail in st.children())
        assert f"stage {stage}," in notes
        # the same pipeline runs the next step correctly
        fail.armed = False
        for p in model.parameters():
            p.grad = None
        _, ref = reference_grads(model, loss_fn, x, y)
        run_bounded(lambda: pipe.step(x, y))
        assert_grads_equal(model, ref)


def test_error_during_recompute_is_reported_in_the_backward():
    model, fail = failing_model("forward", 1, calls=2)  # 1st call: F0.0, 2nd: its recompute
    with Pipeline(model, schedule="gpipe", balance=[4, 3], chunks=1, checkpoint="always",
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        with pytest.raises(ValueError, match="injected") as info:
            run_bounded(lambda: pipe.step(torch.randn(4, 8, dtype=torch.float64),
                                          torch.zeros(4, dtype=torch.long)))
    assert "raised in backward B0.0 (stage 0, micro-batch 0)" in info.value.__notes__[0]


def test_loss_fn_error_names_the_last_stage():
    def bad_loss(out, target):
        raise ZeroDivisionError("in loss")

    with Pipeline(mlp(layers=6), schedule="1f1b", balance=[3, 3], chunks=3, loss_fn=bad_loss) as pipe:
        with pytest.raises(ZeroDivisionError) as info:
            run_bounded(lambda: pipe.step(torch.randn(6, 8, dtype=torch.float64), torch.zeros(6)))
        assert "stage 1" in " ".join(info.value.__notes__)


@pytest.mark.parametrize("bad", [None, [1], {"x": 1}, (1, 2), ()])
def test_stage_returning_a_non_tensor_is_a_type_error_naming_the_stage(bad):
    class Bad(nn.Module):
        def forward(self, x):
            return bad

    model = nn.Sequential(nn.Linear(8, 8), Bad(), nn.Linear(8, 8))
    with Pipeline(model, balance=[2, 1], chunks=2, loss_fn=nn.MSELoss()) as pipe:
        with pytest.raises(TypeError, match="stage 0 returned"):
            run_bounded(lambda: pipe.step(torch.randn(4, 8), torch.randn(4, 8)))


def test_each_rank_keeps_its_thread_across_steps():
    seen: list[tuple[int, str]] = []

    class Who(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            seen.append((self.tag, threading.current_thread().name))
            return x

    model = nn.Sequential(nn.Linear(4, 4), Who(0), nn.Linear(4, 4), Who(1))
    with Pipeline(model, balance=[2, 2], chunks=2, loss_fn=nn.MSELoss()) as pipe:
        for _ in range(3):
            pipe.step(torch.randn(4, 4), torch.randn(4, 4))
    by_tag = {tag: {name for t, name in seen if t == tag} for tag in (0, 1)}
    assert by_tag == {0: {"pipesched-rank0"}, 1: {"pipesched-rank1"}}
    assert threading.current_thread().name not in {name for _, name in seen}


def test_closing_and_dropping_pipelines_leaks_no_threads(no_thread_leak):
    for _ in range(8):
        with Pipeline(mlp(layers=6), schedule="1f1b", balance=[3, 3]) as pipe:
            pipe(torch.randn(2, 8, dtype=torch.float64))
    for _ in range(8):
        pipe = Pipeline(mlp(layers=6), schedule="1f1b", balance=[3, 3], loss_fn=nn.CrossEntropyLoss())
        pipe.step(torch.randn(2, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
        del pipe
    gc.collect()  # the no_thread_leak fixture fails the test if any pipesched thread survives


def test_close_is_idempotent_and_closed_pipeline_refuses_work(no_thread_leak):
    pipe = Pipeline(mlp(layers=6), balance=[3, 3], loss_fn=nn.CrossEntropyLoss())
    pipe.close()
    pipe.close()
    with pytest.raises(RuntimeError, match="closed"):
        pipe(torch.randn(2, 8, dtype=torch.float64))


def test_every_task_emits_one_structlog_event():
    with Pipeline(mlp(layers=6), schedule="1f1b", balance=[3, 3], chunks=4,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        with structlog.testing.capture_logs() as events:
            pipe.step(torch.randn(8, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.long))
        tasks = [e for e in events if e["event"] == "task"]
        assert len(tasks) == len(pipe.last_report.tasks) == 2 * 2 * 4
        for event, record in zip(tasks, pipe.last_report.tasks):
            for key in ("rank", "stage", "microbatch", "kind", "start", "end"):
                assert event[key] == getattr(record, key)
            assert event["end"] >= event["start"]


def test_unconfigured_application_sees_no_output():
    code = textwrap.dedent(
        """
        import torch
        from torch import nn
        from pipesched import Pipeline
        torch.set_num_threads(1)  # one core per rank: no oversubscription warning (not what this test is about)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        with Pipeline(model, schedule="1f1b", chunks=2, loss_fn=nn.MSELoss()) as pipe:
            pipe.step(torch.randn(4, 4), torch.randn(4, 2))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


@pytest.mark.asyncio
async def test_step_works_inside_a_running_event_loop():
    """Jupyter and async trainers call step() from a thread that runs a loop."""
    asyncio.get_running_loop()
    model = mlp(layers=6)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    _, ref = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    with Pipeline(model, schedule="1f1b", balance=[3, 3], chunks=3, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
    assert_grads_equal(model, ref)


def test_step_under_no_grad_is_refused():
    with Pipeline(mlp(layers=6), balance=[3, 3], loss_fn=nn.CrossEntropyLoss()) as pipe:
        with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
            pipe.step(torch.randn(2, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.long))


def test_caller_autocast_applies_inside_workers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    with Pipeline(model, balance=[2, 1], chunks=3) as pipe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pipe(x)
        plain = pipe(x)
    assert expected.dtype == out.dtype == torch.bfloat16
    assert plain.dtype == torch.float32
    torch.testing.assert_close(out, expected)
