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

Across processes (``DistributedPipeline``) each process has its own scaler,
which sees only its own gradients: one would skip a step that another takes.
So whether any gradient is inf or NaN (:func:`gradients_finite`) is shared
at the end of the step, and if one is, every process's gradients are made
NaN (:func:`poison_gradients`): every scaler then skips and backs off alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["backward_seed", "gradients_finite", "poison_gradients"]


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


@torch.no_grad()
def gradients_finite(parameters: Any) -> bool:
    """Whether every gradient of ``parameters`` is finite (one host sync per device, as a scaler's check)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    flags = [torch.isfinite(g).all() for g in grads]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


@torch.no_grad()
def poison_gradients(parameters: Any) -> None:
    """Make every gradient of ``parameters`` NaN, so this process's scaler skips the step too."""
    for p in parameters:
        if p.grad is not None:
            p.grad.fill_(float("nan"))
