"""Layers of known cost for the tuner's tests and benchmark: F, B (input gradient) and W sleep.

``SleepLayer(forward_s, input_s, weight_s, fixed_s)`` computes
``y = SleepInput(x) + SleepWeight(x.detach(), weight)`` (benchmark 10's
stage) with every sleep scaled by the micro-batch: a pass over ``rows`` rows
sleeps ``fixed_s + rows × per_row_s``. So cost grows with the micro-batch as
real layers' does, and a per-call overhead makes tiny micro-batches
expensive: the number of micro-batches has a real optimum, and a profile
taken at the wrong size mispredicts. ``time.sleep`` releases the GIL, so
ranks overlap as on separate devices.

The engine's B (``backward_input``) runs only ``SleepInput``'s backward, its
W only ``SleepWeight``'s, an unsplit backward both.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

__all__ = ["SleepInput", "SleepLayer", "SleepWeight", "sleep_model"]


class SleepInput(torch.autograd.Function):
    """Forward sleeps ``forward_s``, backward ``input_s``; the input's gradient only (no parameter)."""

    @staticmethod
    def forward(ctx, x: Tensor, forward_s: float, input_s: float) -> Tensor:  # type: ignore[override]
        ctx.input_s = input_s
        if forward_s > 0:
            time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.input_s > 0:
            time.sleep(ctx.input_s)
        return grad, None, None


class SleepWeight(torch.autograd.Function):
    """``weight`` broadcast to ``x``'s shape; backward sleeps ``weight_s`` and gives the weight's gradient only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, weight_s: float) -> Tensor:  # type: ignore[override]
        ctx.weight_s = weight_s
        return weight.expand_as(x).clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.weight_s > 0:
            time.sleep(ctx.weight_s)
        return None, grad.sum().reshape(1), None


class SleepLayer(nn.Module):
    """A layer whose F, B and W each sleep ``fixed_s + rows × <per-row seconds>``."""

    def __init__(self, forward_s: float, input_s: float, weight_s: float, fixed_s: float = 0.0):
        super().__init__()
        self.forward_s, self.input_s, self.weight_s, self.fixed_s = (
            float(forward_s), float(input_s), float(weight_s), float(fixed_s))
        self.weight = nn.Parameter(torch.zeros(1))

    def seconds(self, per_row: float, rows: int) -> float:
        return self.fixed_s + per_row * rows

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        return (SleepInput.apply(x, self.seconds(self.forward_s, rows), self.seconds(self.input_s, rows))
                + SleepWeight.apply(x.detach(), self.weight, self.seconds(self.weight_s, rows)))

    def extra_repr(self) -> str:
        return (f"forward_s={self.forward_s}, input_s={self.input_s}, weight_s={self.weight_s} per row, "
                f"fixed_s={self.fixed_s}")


def sleep_model(per_row_ms: list[float], fixed_ms: float = 0.0) -> nn.Sequential:
    """One :class:`SleepLayer` per entry: F = B = W = ``ms`` per row, plus ``fixed_ms`` per pass."""
    return nn.Sequential(*[SleepLayer(ms / 1e3, ms / 1e3, ms / 1e3, fixed_ms / 1e3) for ms in per_row_ms])
