"""Loss scaling for float16 mixed precision: torch's ``GradScaler``, where a pipeline's backward runs.

torch's recipe is ``scaler.scale(loss).backward()``, then
``scaler.step(optimizer)`` and ``scaler.update()``. A pipeline runs the
backward itself, inside ``step()``, so the caller never holds a loss to
scale. ``pipe.step(x, y, scaler=scaler)`` puts the scale where that backward
starts: every micro-batch's backward is seeded with the scale instead of 1,
which is what differentiating ``scaler.scale(loss)`` computes, so ``.grad``
(and an input's gradient) hold the scaled gradients that ``scaler.step``
unscales and checks for infinities as usual. The returned loss is not scaled.

The seed is read from the scaler once per step, on the caller's thread,
with ``scaler.scale(1)`` on the last stage's device: no host-device sync,
and the scaler's lazy set-up never runs on two worker threads at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["backward_seed"]


def backward_seed(scaler: Any, device: torch.device) -> Tensor | None:
    """The scale each micro-batch's backward starts from, on ``device``; ``None``: no scaling (1).

    ``scaler``: a ``torch.amp.GradScaler`` (``torch.cuda.amp.GradScaler``
    too), or ``None``. A disabled scaler (``enabled=False``) scales nothing,
    as in torch.
    """
    if scaler is None:
        return None
    if not (callable(getattr(scaler, "scale", None)) and callable(getattr(scaler, "is_enabled", None))):
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}; "
            f"e.g. scaler = torch.amp.GradScaler('cuda'); loss = pipe.step(x, y, scaler=scaler); "
            f"scaler.step(optimizer); scaler.update()"
        )
    if not scaler.is_enabled():
        return None
    return scaler.scale(torch.ones((), dtype=torch.float32, device=device))
