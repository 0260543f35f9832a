"""What the engine itself costs per task on these ranks: one short calibration the predictions add.

A profile times each layer alone; a pipeline also pays, per task, for the
dispatch, the readiness signals between ranks and the bookkeeping (records,
the memory meter). On small layers that is a large share of a step, and a
plan with more tasks (a split backward adds a W per micro-batch) pays it
more often. :func:`engine_overhead` measures it: a pipeline of near-empty
stages (``nn.Linear(1, 1)``) runs a few steps of 1F1B, and the median step
time divided by the plan's critical path in tasks (the simulator's makespan
at one unit per task) is the seconds per task.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from pipesched.pipeline import Pipeline
from pipesched.plan.registry import get_schedule
from pipesched.plan.simulate import simulate

__all__ = ["engine_overhead"]


def engine_overhead(devices: Sequence[torch.device | str], steps: int = 5) -> float:
    """Seconds the engine adds per task on ``devices`` (one per rank), from ``steps`` timed steps of 1F1B."""
    ranks = len(devices)
    chunks = 2 * ranks
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(ranks)])
    x, y = torch.zeros(chunks, 1), torch.zeros(chunks, 1)
    times = []
    with Pipeline(model, schedule="1f1b", balance=[1] * ranks, devices=list(devices), chunks=chunks,
                  loss_fn=nn.MSELoss()) as pipe:
        for step in range(1 + steps):
            began = time.perf_counter()
            pipe.step(x, y)
            if step:
                times.append(time.perf_counter() - began)
    path = simulate(get_schedule("1f1b").plan(ranks, chunks, ranks), lambda kind, stage: 1.0).makespan
    return statistics.median(times) / path
