"""Pipeline replicas trained as one model: data parallelism across pipelines (2D parallelism).

Several pipelines of the same model, each on its own process group, each fed
its own part of the global batch. Process ``r`` of one pipeline and process
``r`` of every other hold the same stages; ``data_parallel_group`` joins
those. After every step, inside ``step()``:

* each replica's gradients are weighted by its share of the global batch's
  normaliser (its count ÷ every replica's, e.g. tokens that are not
  padding; 1 for a summed loss) and summed over the group, so every replica
  holds the gradients of the un-pipelined model on the *global* batch, not
  an average of per-replica means (which differs whenever replicas count
  different numbers of tokens);
* the returned loss is the global batch's loss, on every process;
* buffers (batch-norm statistics) are broadcast from the group's first
  process, as ``DistributedDataParallel`` does, so replicas stay identical.

At construction the group's first process broadcasts every parameter and
buffer, so replicas start equal whatever each process's seed; the group's
processes must hold the same stages of the same layout (checked, with the
difference named).

A step that fails on one replica fails on all: every replica enters the
exchange whether or not its own step succeeded (one all-reduce carries
"ok"), and each rolls its gradients back. No replica waits for one that
raised.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipesched.distributed.errors import RemoteStepError


class DataParallelReplicas:
    """This process's place among the replicas of its stages: the group, and the exchanges over it."""

    def __init__(self, group: Any, layout: tuple[Any, ...], module: nn.Module):
        if group is None:
            raise TypeError("data_parallel_group must be a process group (torch.distributed.new_group([...]))")
        self.group = group
        self.size = dist.get_world_size(group)
        if dist.get_rank(group) < 0:
            raise ValueError(
                "data_parallel_group does not contain this process: pass, on each process, the group of the "
                "processes that hold the same stages as it in the other pipelines"
            )
        layouts: list[Any] = [None] * self.size
        dist.all_gather_object(layouts, layout, group=group)
        if any(other != layout for other in layouts):
            raise ValueError(
                "data_parallel_group joins processes that hold different stages: "
                f"{layouts} (pipeline rank, stages, placement, layers per stage); each pipeline must be built "
                "from the same model with the same schedule, balance and number of processes"
            )
        self.root = dist.get_global_rank(group, 0)
        self.broadcast(module, parameters=True)

    @torch.no_grad()
    def broadcast(self, module: nn.Module, parameters: bool = False) -> None:
        """Every replica takes the group's first process's buffers (and parameters)."""
        tensors = list(module.buffers()) + (list(module.parameters()) if parameters else [])
        for tensor in tensors:
            staged = tensor.detach().cpu() if tensor.device.type != "cpu" else tensor.detach()
            dist.broadcast(staged, src=self.root, group=self.group)
            if staged is not tensor:
                tensor.copy_(staged)

    @torch.no_grad()
    def reduce(self, ok: bool, normaliser: float | None, loss: float, parameters: list[nn.Parameter]) -> float:
        """Combine this replica's step with the others'; returns the global batch's loss.

        ``normaliser``: this replica's batch count (``None``: a summed loss,
        each replica counts 1). Raises :class:`RemoteStepError` if another
        replica's step failed (after every replica joined the exchange).
        """
        share = 1.0 if normaliser is None else normaliser
        weighted = share * loss if share else 0.0  # a replica that counts nothing adds nothing (not 0 * NaN)
        head = torch.tensor([float(ok), share, weighted], dtype=torch.float64)
        dist.all_reduce(head, op=dist.ReduceOp.SUM, group=self.group)
        if head[0] < self.size:
            if ok:
                raise RemoteStepError(f"{self.size - int(head[0])} of the {self.size} data-parallel replicas "
                                      "failed this step; no replica's gradients changed")
            return math.nan
        total = float(head[1])
        factor = (share / total if total else 0.0) if normaliser is not None else 1.0
        with_grad = [p for p in parameters if p.requires_grad]
        for dtype in sorted({p.dtype for p in with_grad}, key=str):
            params = [p for p in with_grad if p.dtype == dtype]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).cpu()
                              for p in params])
            if factor != 1.0:
                flat.mul_(factor)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            offset = 0
            for p in params:
                part = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(part)
        if normaliser is None:
            return float(head[2])
        return float(head[2]) / total if total else math.nan


__all__ = ["DataParallelReplicas"]
