"""Gradient clipping across a pipeline's processes: one norm over the whole model's gradients.

``torch.nn.utils.clip_grad_norm_(pipe.parameters(), max_norm)`` on one process
sees only that rank's stages, so each process would clip by its own norm:
every rank's gradients scaled by a different factor, an update that no
un-pipelined run makes, and no error to say so. Here:

* each process takes the norm of each of its gradients, as torch does, and
  reduces them to one number: the sum of their p-th powers (their maximum
  for the inf-norm);
* a weight tied across processes (see :mod:`pipesched.distributed.tied`)
  has the same, already summed gradient on every holder, so only its lowest
  holder counts it;
* one all-reduce (sum, or max) over the pipeline's group gives every process
  the whole model's norm, and every process scales its gradients by the same
  ``min(1, max_norm / (norm + 1e-6))``: torch's coefficient, applied to
  every copy of a tied weight alike, so the copies stay identical.

Under a ``DeviceMesh`` with ``"dp"`` and FSDP2 each process holds a shard of
each gradient: the shards' p-th powers are summed over ``mesh["dp"]`` before
the stages' over ``mesh["pp"]``, and each process scales its own shards.

The result is ``clip_grad_norm_`` of the un-pipelined model, up to the order
of the floating-point sum of the per-tensor norms.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_across(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float,
                          error_if_nonfinite: bool, group: Any, counted_elsewhere: Collection[int] = (),
                          sharded_over: Any = None) -> Tensor:
    """Clip this process's gradients by the norm of every process's; returns that norm (float64, CPU).

    Call it on every process of ``group`` (and of ``sharded_over``), after the step. ``counted_elsewhere``:
    ids of parameters another process counts (tied copies it does not own). ``sharded_over``: the
    group that shards the gradients (FSDP2's ``mesh["dp"]``): each process then holds a shard of each
    gradient (a ``DTensor``'s local part), and the shards' sums are added over that group first. A
    replicated ``DTensor`` gradient (``replicate``) counts its local copy, the whole gradient.
    """
    max_norm, norm_type = _check(max_norm, norm_type)
    params = [p for p in parameters if p.grad is not None]
    grads = [_local(p.grad) for p in params]
    counted = [_local(p.grad) for p in params if id(p) not in counted_elsewhere]
    norms = [torch.linalg.vector_norm(g, norm_type).to("cpu", torch.float64) for g in counted]
    infinite = math.isinf(norm_type)
    if not norms:
        local = torch.zeros((), dtype=torch.float64)
    elif infinite:
        local = torch.stack(norms).max()
    else:
        local = torch.stack(norms).pow(norm_type).sum()
    op = dist.ReduceOp.MAX if infinite else dist.ReduceOp.SUM
    if sharded_over is not None:  # the shards of every gradient first, then the pipeline's stages
        dist.all_reduce(local, op=op, group=sharded_over)
    dist.all_reduce(local, op=op, group=group)
    total = local if infinite else local.pow(1.0 / norm_type)
    if error_if_nonfinite and not math.isfinite(float(total)):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the pipeline's gradients is {float(total)}, so they cannot be "
            f"clipped; pass error_if_nonfinite=False to scale them by it anyway (every process raises alike)"
        )
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coefficient.to(grad.device, grad.dtype))
    return total


def _local(grad: Tensor) -> Tensor:
    """This process's part of ``grad``: a ``DTensor``'s local tensor (its storage), else ``grad`` itself."""
    return grad.to_local() if isinstance(grad, DTensor) else grad


def _check(max_norm: Any, norm_type: Any) -> tuple[float, float]:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"max_norm must be a number >= 0, got {max_norm!r}; e.g. pipe.clip_grad_norm_(1.0)")
    if isinstance(norm_type, str) and norm_type == "inf":
        return float(max_norm), math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
        raise ValueError(
            f"norm_type must be a number > 0 or float('inf'), got {norm_type!r}; e.g. norm_type=2.0"
        )
    return float(max_norm), float(norm_type)


__all__ = ["clip_grad_norm_across"]
