""""Don't pipeline" as the tuner prices and runs it: the plain model, or gradient accumulation.

Predicted from the same profiles as the pipelines (every layer's forward and
whole backward at the micro-batch size, one after the other on one device,
no engine), and run the way a user trains without a pipeline: per
micro-batch ``loss_fn(model(x_i), y_i) * rows_i / rows`` then ``backward()``,
so the gradients are those of the whole batch for a mean-reduced loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipesched.runtime.microbatch import split_sizes
from pipesched.tune.candidate import NO_PIPELINE, Candidate
from pipesched.tune.costs import Profile

__all__ = ["unpipelined_candidate", "unpipelined_step"]


def unpipelined_candidate(profiles: Mapping[int, Profile], rows: int, chunks: int, device: str,
                          budget: int | None) -> Candidate:
    """The model on ``device`` over ``chunks`` micro-batches (1: the plain model), priced from ``profiles``."""
    sizes = split_sizes(rows, chunks)
    layers = len(profiles[sizes[0]])
    seconds = math.fsum(_whole(profiles[size], layers).step_s for size in sizes)
    stage = _whole(profiles[max(sizes)], layers)
    peak = stage.activation_bytes + stage.parameter_bytes + stage.grad_bytes
    return Candidate(NO_PIPELINE, [layers], len(sizes), "never", [device], seconds, [peak], 0.0,
                     budget is None or peak <= budget)


def _whole(profile: Profile, layers: int):
    return profile.stage(0, layers, first_stage=True)


def unpipelined_step(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], torch.Tensor],
                     chunks: int, device: Any) -> Callable[[], None]:
    """One training step's forward and backward without a pipeline, as a callable (for timing)."""
    model.to(device)
    tensors = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    rows = tensors[0].shape[0]
    sizes = split_sizes(rows, chunks)
    parts = []
    first = 0
    for size in sizes:
        x = tuple(t[first:first + size].to(device) for t in tensors)
        y = _slice(targets, first, size, device)
        parts.append((x if len(x) > 1 else x[0], y, size / rows))
        first += size

    def step() -> None:
        model.zero_grad(set_to_none=True)
        for x, y, share in parts:
            (loss_fn(model(x), y) * share).backward()

    return step


def _slice(value: Any, first: int, size: int, device: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value[first:first + size].to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, first, size, device) for v in value)
    return value


def sizes_needed(rows: int, counts: Sequence[int]) -> set[int]:
    """Micro-batch sizes the "don't pipeline" candidates need profiled: the whole batch and each count's."""
    return {rows} | {size for m in counts for size in split_sizes(rows, m)}
