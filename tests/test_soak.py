"""Long runs: hundreds of steps, varying batch sizes, schedules swapped between steps.

A leak in threads, live tensors or held activations grows with the step count;
this test fails if anything grows. ``PIPESCHED_SOAK_STEPS`` sets the length
(default 300); the figures print with ``pytest -s``.
"""

from __future__ import annotations

import gc
import os
import random
import threading

import torch
from torch import nn

from pipesched import Pipeline

STEPS = int(os.environ.get("PIPESCHED_SOAK_STEPS", "300"))


def live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): isinstance reads __class__, which some torch objects warn on
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def test_soak_no_growth_in_threads_tensors_or_held_bytes():
    torch.manual_seed(0)
    model = nn.Sequential(*[layer for _ in range(4) for layer in (nn.Linear(32, 32), nn.GELU())],
                          nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    pipes = [
        Pipeline(model, schedule="gpipe", balance=[5, 4], chunks=4, loss_fn=nn.CrossEntropyLoss()),
        Pipeline(model, schedule="1f1b", balance=[5, 4], chunks=4, checkpoint="never",
                 loss_fn=nn.CrossEntropyLoss()),
        Pipeline(model, schedule="interleaved", balance=[3, 2, 2, 2], chunks=4, checkpoint="always",
                 loss_fn=nn.CrossEntropyLoss()),
    ]
    rnd = random.Random(0)
    peaks: list[int] = []

    def train(steps: int) -> None:
        for step in range(steps):
            pipe = pipes[step % len(pipes)]
            rows = rnd.randint(1, 40)
            optimizer.zero_grad()
            loss = pipe.step(torch.randn(rows, 32), torch.randint(0, 4, (rows,)))
            assert torch.isfinite(loss)
            optimizer.step()
            report = pipe.last_report
            assert report.held_activation_bytes == [0] * pipe.num_ranks
            peaks.append(max(report.peak_activation_bytes))

    try:
        train(30)  # warm-up: optimizer state, plan caches for every micro-batch count
        threads_start, tensors_start = threading.active_count(), live_tensors()
        train(STEPS)
        threads_end, tensors_end = threading.active_count(), live_tensors()
    finally:
        for pipe in pipes:
            pipe.close()
    print(f"\nsoak: {STEPS} steps; threads {threads_start} -> {threads_end}; "
          f"live tensors {tensors_start} -> {tensors_end}; "
          f"held bytes after every step 0; peak activation bytes max {max(peaks)}")
    assert threads_end == threads_start
    assert tensors_end <= tensors_start
