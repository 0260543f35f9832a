"""Stages of known duration that release the GIL: forward sleeps ``f``, backward sleeps ``b``.

A stage is one :class:`SleepStage` layer: ``x + w`` with a scalar parameter
``w`` (so the first stage's output requires grad and its backward runs) inside
a custom autograd Function whose forward calls ``time.sleep(f)`` and whose
backward calls ``time.sleep(b)``. ``time.sleep`` releases the GIL, so ranks
overlap exactly as they would on devices, and what a step takes beyond the
plan's replay on these costs is the engine's own overhead.

``time.sleep(t)`` takes longer than ``t`` (timer slack, wake-up latency):
:func:`calibrate_sleep` measures what it really takes here. A stage costs a
little more than its sleep (the autograd Function call, ``x + w``, the
backward's autograd engine run), which any runner of the model pays, not
only a pipeline: :func:`calibrate_stage` measures a whole stage's forward and
backward on the calling thread, outside any pipeline, and those medians are
the costs the simulator replays.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from benchmarks.stats import summary


class _SleepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, forward_s: float, backward_s: float) -> Tensor:  # type: ignore[override]
        ctx.backward_s = backward_s
        if forward_s > 0:
            time.sleep(forward_s)
        return x + weight

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.backward_s > 0:
            time.sleep(ctx.backward_s)
        return grad, grad.sum().reshape(1), None, None


class SleepStage(nn.Module):
    """One pipeline stage whose forward takes ``forward_s`` and backward ``backward_s`` seconds."""

    def __init__(self, forward_s: float, backward_s: float):
        super().__init__()
        self.forward_s = float(forward_s)
        self.backward_s = float(backward_s)
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return _SleepFunction.apply(x, self.weight, self.forward_s, self.backward_s)

    def extra_repr(self) -> str:
        return f"forward_s={self.forward_s}, backward_s={self.backward_s}"


def sleep_model(num_stages: int, forward_s: float, backward_s: float) -> nn.Sequential:
    """``num_stages`` sleep stages; cut it with ``balance=[1] * num_stages``."""
    return nn.Sequential(*[SleepStage(forward_s, backward_s) for _ in range(num_stages)])


def calibrate_sleep(durations: Iterable[float], samples: int = 30) -> dict[float, dict[str, float | int]]:
    """For each requested duration: summary of what ``time.sleep(d)`` really took (seconds)."""
    clock = time.perf_counter
    out: dict[float, dict[str, float | int]] = {}
    for d in sorted({float(x) for x in durations}):
        taken = []
        for _ in range(samples):
            start = clock()
            time.sleep(d)
            taken.append(clock() - start)
        out[d] = summary(taken)
    return out


def calibrate_stage(forward_s: float, backward_s: float, samples: int = 30) -> dict[str, dict[str, float | int]]:
    """Summaries of one :class:`SleepStage`'s forward and backward, timed alone on this thread (seconds).

    The forward is called on a leaf that requires grad and the backward runs
    through ``torch.autograd.backward(output, grad)``, as in a pipeline stage.
    """
    clock = time.perf_counter
    stage = SleepStage(forward_s, backward_s)
    leaf = torch.zeros(1, 1, requires_grad=True)
    grad = torch.ones(1, 1)
    forwards, backwards = [], []
    for _ in range(samples + 1):
        start = clock()
        out = stage(leaf)
        middle = clock()
        torch.autograd.backward([out], [grad])
        end = clock()
        forwards.append(middle - start)
        backwards.append(end - middle)
    return {"F": summary(forwards[1:]), "B": summary(backwards[1:])}
