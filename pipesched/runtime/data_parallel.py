"""Pipeline replicas trained as one model: data parallelism across pipelines (2D parallelism).

Several pipelines of the same model, each fed its own part of the global
batch. For ``DistributedPipeline``s (each on its own process group), process
``r`` of one pipeline and process ``r`` of every other hold the same stages,
and ``data_parallel_group`` joins those; a single-process ``Pipeline`` holds
every stage, and ``data_parallel_group`` joins the processes running one
each (say, one per node, each pipelining over its own GPUs). After every
step, inside ``step()``, before its gradients are committed:

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
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipesched.runtime.host_buffer import refuse_sparse_gradients, through_host
from pipesched.runtime.remote_error import RemoteStepError


def check_data_parallel_group(group: Any) -> None:
    """Refuse, before anything is built, a ``data_parallel_group`` that cannot work (naming the fix)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "data_parallel_group needs torch.distributed: call torch.distributed.init_process_group('gloo') "
            "first, then pass a group of it (e.g. torch.distributed.group.WORLD)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"data_parallel_group must be a torch.distributed process group, got {type(group).__name__}; "
            f"e.g. torch.distributed.group.WORLD or torch.distributed.new_group([...])"
        )
    backend = dist.get_backend(group)
    if backend != "gloo":
        raise NotImplementedError(
            f"data_parallel_group must use the gloo backend (gradients are staged through host memory); "
            f"it uses {backend!r}: create it with torch.distributed.new_group([...], backend='gloo')"
        )


class DataParallelReplicas:
    """This process's place among the replicas of its stages: the group, and the exchanges over it."""

    def __init__(self, group: Any, layout: tuple[Any, ...], module: nn.Module):
        check_data_parallel_group(group)
        self.group = group
        self.size = dist.get_world_size(group)
        if dist.get_rank(group) < 0:
            raise ValueError(
                "data_parallel_group does not contain this process: pass, on each process, the group of the "
                "processes that hold the same stages as it in the other pipelines"
            )
        refuse_sparse_gradients([module], "data_parallel_group")  # the same model on every replica: all refuse
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
        """Every replica takes the group's first process's buffers (and parameters).

        One broadcast per dtype (the tensors flattened into one host buffer),
        not one per tensor: a ResNet's hundreds of batch-norm buffers cross
        in one or two messages after every step.
        """
        tensors = list(module.buffers()) + (list(module.parameters()) if parameters else [])
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            same = [t for t in tensors if t.dtype == dtype]
            through_host(same, partial(dist.broadcast, src=self.root, group=self.group), same)

    def fail(self) -> None:
        """This replica's step failed before the exchange: tell the others, so none waits for it.

        A replica that is gone too makes the exchange raise; this replica's own
        error is what its caller raises, so that is ignored here.
        """
        try:
            self.reduce(False, None, math.nan, [])
        except RuntimeError:
            pass

    @torch.no_grad()
    def reduce(self, ok: bool, normaliser: float | None, loss: float, parameters: list[nn.Parameter]
               ) -> tuple[float, float]:
        """Combine this replica's step with the others'; returns the global batch's loss, and the
        factor this replica's gradients were weighted by (for its inputs' gradients, if any).

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
            return math.nan, 0.0
        total = float(head[1])
        factor = (share / total if total else 0.0) if normaliser is not None else 1.0
        with_grad = [p for p in parameters if p.requires_grad]
        for p in with_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

        def weighted_sum(flat: Tensor) -> None:
            if factor != 1.0:
                flat.mul_(factor)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)

        for dtype in sorted({p.dtype for p in with_grad}, key=str):
            grads = [p.grad for p in with_grad if p.dtype == dtype]
            through_host(grads, weighted_sum, grads)
        if normaliser is None:
            return float(head[2]), factor
        return (float(head[2]) / total if total else math.nan), factor


def combine_replicas(replicas: DataParallelReplicas, ctx: Any, normaliser: float | None, loss: float,
                     parameters: list[nn.Parameter]) -> float:
    """A successful step's (or backward half's) gradients, its inputs' gradients and its loss,
    combined with the other replicas'; returns the global batch's loss.

    The one combine that ``Pipeline.step``, ``Pipeline``'s backward half and
    ``DistributedPipeline.step`` all call, so what data parallelism does to
    ``.grad`` and to the inputs' gradients cannot differ between them. Call it
    before the gradients are committed (``.grad`` holds only this step's).
    """
    joined, factor = replicas.reduce(True, normaliser, loss, parameters)
    scale_input_gradients(ctx, factor)
    return joined


def scale_input_gradients(ctx: Any, factor: float) -> None:
    """Weight the gradients a step computed for its inputs (``StepResults.input_grads``) by ``factor``:
    the global batch's loss depends on this replica's inputs through its share only."""
    if factor == 1.0:
        return
    results = ctx.results.input_grads
    for microbatch, grads in list(results.items()):
        results[microbatch] = tuple(None if g is None else g * factor for g in grads)


__all__ = ["DataParallelReplicas", "check_data_parallel_group", "combine_replicas", "scale_input_gradients"]
