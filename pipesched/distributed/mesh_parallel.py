"""Data parallelism on a ``DeviceMesh`` by torch's own parts: FSDP2 ``fully_shard`` or ``replicate``.

``DistributedPipeline(model, mesh=mesh)`` with a mesh of dimensions
``("pp", "dp")`` pipelines over ``mesh["pp"]`` and hands each rank's stages
to torch for data parallelism over ``mesh["dp"]``: ``data_parallel="fsdp"``
shards every stage with ``fully_shard`` (each stage one FSDP unit),
``"ddp"`` replicates it with ``replicate`` (FSDP2's replicated flavour, the
one ``torch.distributed.pipelining`` pairs with pipelines). torch does the
gathering and the gradient reduction; this module only decides *when*, the
way ``torch.distributed.pipelining`` does:

* at the start of a step every stage is unsharded once (one all-gather per
  stage, in stage order, on the step's calling thread). The schedule's
  forwards and backwards then run on worker threads without any collective:
  the per-micro-batch hooks find the parameters gathered, and gradient
  sync and resharding are switched off, so the unsharded gradients simply
  accumulate. Zero-bubble W tasks can therefore never trigger a reduction
  before the last micro-batch;
* after every rank of every replica finished, one all-reduce over
  ``mesh["dp"]`` carries (ok, normaliser, weighted loss). If any replica
  failed, every replica drops its unsharded gradients and reshards (no
  ``.grad`` changes); otherwise each replica multiplies its unsharded
  gradients by its share of the global normaliser (tokens that are not
  padding, say; 1 for a summed loss), and FSDP's own post-backward runs
  with gradient sync on and a divide factor of 1: the reduce-scatter (or
  all-reduce) then *sums* the weighted gradients, which is the un-pipelined
  model's gradient on the global batch even when replicas count different
  numbers of tokens (an average of per-replica means would not be).

Every replica enters the same collectives in the same order whether its
step succeeded or not (the unshard first thing, then the head all-reduce),
so a failure never leaves another replica waiting in one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from pipesched.runtime.data_parallel import scale_input_gradients
from pipesched.runtime.remote_error import RemoteStepError

DATA_PARALLEL_KINDS = ("fsdp", "ddp")


def split_mesh(mesh: Any, data_parallel: Any, group: Any, data_parallel_group: Any
               ) -> tuple[Any, DeviceMesh | None]:
    """``mesh``'s pipeline group and its ``"dp"`` sub-mesh (``None`` without one), or a clear refusal."""
    if data_parallel not in DATA_PARALLEL_KINDS:
        raise ValueError(f"data_parallel must be one of {DATA_PARALLEL_KINDS}, got {data_parallel!r}: "
                         "'fsdp' shards each stage over mesh['dp'], 'ddp' replicates it")
    if mesh is None:
        return group, None
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}; "
                        "e.g. init_device_mesh('cpu', (2, 2), mesh_dim_names=('pp', 'dp'))")
    if group is not None or data_parallel_group is not None:
        raise ValueError("pass either mesh= or group=/data_parallel_group=, not both: mesh['pp'] is the pipeline's "
                         "group and mesh['dp'] its data-parallel group")
    names = tuple(mesh.mesh_dim_names or ())
    if "pp" not in names or not set(names) <= {"pp", "dp"}:
        raise ValueError(f"mesh must have a dimension named 'pp' and optionally 'dp' (no other), got "
                         f"mesh_dim_names={mesh.mesh_dim_names!r}; e.g. init_device_mesh('cpu', (2, 2), "
                         "mesh_dim_names=('pp', 'dp'))")
    return mesh.get_group("pp"), (mesh["dp"] if "dp" in names else None)


def refuse_under_mesh(deferred_batch_norm: bool) -> None:
    """What data parallelism over ``mesh["dp"]`` does not handle yet, refused by name (not silently wrong)."""
    if deferred_batch_norm:
        raise NotImplementedError("deferred_batch_norm=True is not supported with a mesh that has a 'dp' "
                                  "dimension yet (its statistics are committed per pipeline, not per replica): "
                                  "pass deferred_batch_norm=False")


class MeshReplicas:
    """This rank's stages, sharded (``"fsdp"``) or replicated (``"ddp"``) over ``dp_mesh``."""

    def __init__(self, dp_mesh: DeviceMesh, kind: str, stages: dict[int, nn.Module], layout: Any,
                 loss_parameters: list[nn.Parameter] | None = None, holds_loss: bool = False):
        self.kind = kind
        self.group = dp_mesh.get_group()
        self.size = dist.get_world_size(self.group)
        layouts: list[Any] = [None] * self.size
        dist.all_gather_object(layouts, (kind, layout), group=self.group)
        if any(other != (kind, layout) for other in layouts):
            raise ValueError(f"mesh['dp'] joins processes that hold different stages or options: {layouts} "
                             "(data_parallel, stages); build every replica from the same model and arguments")
        self.root = dist.get_global_rank(self.group, 0)
        #: the loss function's parameters (on every process; their gradients on the last stage's only)
        self.loss_parameters = list(loss_parameters or ())
        self.holds_loss = holds_loss  # the last stage's process: the loss (and its parameters' gradients) is here
        #: this rank's stages' buffers: plain tensors, which FSDP2 neither shards nor synchronises
        self.buffers = [b for _, stage in sorted(stages.items()) for b in stage.buffers()]
        with torch.no_grad():  # replicas start equal whatever each process's seed
            for stage in stages.values():
                for param in stage.parameters():
                    dist.broadcast(param.data, src=self.root, group=self.group)
            self.broadcast_buffers()
            for param in self.loss_parameters:
                dist.broadcast(param.data, src=self.root, group=self.group)
        self.stages: list[FSDPModule] = []
        for _, stage in sorted(stages.items()):
            if kind == "fsdp":
                fully_shard(stage, mesh=dp_mesh, reshard_after_forward=False)
            else:
                replicate(stage, mesh=dp_mesh)
            assert isinstance(stage, FSDPModule)
            stage.set_gradient_divide_factor(1.0)  # a sum: each replica is weighted by its share beforehand
            stage.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
            self.stages.append(stage)
        #: the parameters the optimizer sees (DTensors); stable objects across steps
        self.parameters: list[nn.Parameter] = [p for s in self.stages for p in s.parameters()]
        self._gathered = False

    def unshard(self) -> None:
        """Gather every stage for the step (collective); gradient sync and resharding deferred. Idempotent."""
        if self._gathered:
            return
        for stage in self.stages:
            stage.set_requires_gradient_sync(False)
            stage.set_reshard_after_backward(False)
            stage.set_is_last_backward(False)
            stage.unshard()
        self._gathered = True

    def reshard(self) -> None:
        """After a forward-only call: back to the sharded parameters (no collective)."""
        for stage in self.stages:
            stage.reshard()
        self._gathered = False

    def fail(self) -> None:
        """This replica's step failed: join the exchange as failed (so none waits), change no ``.grad``."""
        try:
            self.unshard()
            self._exchange(False, None, math.nan)
        except RuntimeError:  # another replica is gone too: this replica's own error is what is raised
            pass
        self._discard()

    @torch.no_grad()
    def reduce(self, normaliser: float | None, loss: float, ctx: Any) -> float:
        """Weight this replica's gradients by its share, let FSDP sum them over ``mesh["dp"]``;
        returns the global batch's loss. Raises :class:`RemoteStepError` if another replica failed."""
        head, share = self._exchange(True, normaliser, loss)
        if head[0] < self.size:
            self._discard()
            raise RemoteStepError(f"{self.size - int(head[0])} of the {self.size} data-parallel replicas "
                                  "(mesh['dp']) failed this step; no replica's gradients changed")
        total = float(head[1])
        factor = (share / total if total else 0.0) if normaliser is not None else 1.0
        for stage in self.stages:
            for param in stage.parameters():  # the unsharded parameters, while gathered
                if not param.requires_grad:
                    continue
                if param.grad is None:  # every replica reduces the same tensors
                    param.grad = torch.zeros_like(param)
                elif factor != 1.0:
                    param.grad.mul_(factor)
        for stage in self.stages:
            _post_backward(stage, reduce=True)
        self._gathered = False
        self._reduce_loss_parameters(factor)
        self.broadcast_buffers()
        scale_input_gradients(ctx, factor)
        if normaliser is None:
            return float(head[2])
        return float(head[2]) / total if total else math.nan

    @torch.no_grad()
    def broadcast_buffers(self) -> None:
        """Every replica takes ``mesh["dp"]``'s first process's buffers (collective).

        The semantics of DDP's ``broadcast_buffers=True`` and of
        ``data_parallel_group``: replicas see different data, so batch-norm
        running statistics would drift apart; after every successful step each
        replica's stages hold the first replica's (computed from its own
        micro-batches), and constant buffers stay equal.
        """
        for buffer in self.buffers:
            dist.broadcast(buffer, src=self.root, group=self.group)

    @torch.no_grad()
    def _reduce_loss_parameters(self, factor: float) -> None:
        """The loss function's parameters' gradients, weighted by this replica's share and summed over
        ``mesh["dp"]`` (only where the loss ran: every replica's last-stage process alike)."""
        params = [p for p in self.loss_parameters if p.requires_grad]
        if not self.holds_loss:  # the same answer on every replica of this pipeline rank
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            elif factor != 1.0:
                param.grad.mul_(factor)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=self.group)

    def agree_nonfinite(self, pp_group: Any) -> bool:
        """Whether any process of the mesh holds a non-finite gradient shard after the reduction; if one
        does, every process's gradients are made NaN so that every ``GradScaler`` skips alike (collective)."""
        local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in self.parameters + self.loss_parameters if p.grad is not None]
        flag = torch.tensor([0.0 if all(bool(torch.isfinite(g).all()) for g in local) else 1.0],
                            dtype=torch.float64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pp_group)
        if flag.item():
            with torch.no_grad():
                for grad in local:
                    grad.fill_(float("nan"))
        return bool(flag.item())

    def _exchange(self, ok: bool, normaliser: float | None, loss: float) -> tuple[Tensor, float]:
        share = 1.0 if normaliser is None else float(normaliser)
        weighted = share * loss if share else 0.0  # a replica that counts nothing adds nothing (not 0 * NaN)
        head = torch.tensor([float(ok), share, weighted], dtype=torch.float64)
        dist.all_reduce(head, op=dist.ReduceOp.SUM, group=self.group)
        return head, share

    def _discard(self) -> None:
        """Drop the step's unsharded gradients and reshard: ``.grad`` stays what it was."""
        for stage in self.stages:
            if self._gathered:
                for param in stage.parameters():
                    param.grad = None
            _post_backward(stage, reduce=False)
        self._gathered = False


def _post_backward(stage: FSDPModule, reduce: bool) -> None:
    """FSDP's end of backward for ``stage``, run by hand once per step, as ``torch.distributed.pipelining``
    does (``_PipelineStageBase.perform_reduce_grad``): the schedule's backwards ran with sync off."""
    stage.set_is_last_backward(reduce)
    stage.set_reshard_after_backward(True)
    stage.set_requires_gradient_sync(reduce)
    state = stage._get_fsdp_state()  # fully_shard's or replicate's
    for each in state._state_ctx.all_states:
        for group in _param_groups(each):
            group.post_backward()
    state._root_post_backward_final_callback()
    stage.reshard()


def _param_groups(state: object) -> list[object]:
    """An FSDP state's parameter groups: a list in torch 2.13, one group (or None) in 2.11 (the GPU image)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


__all__ = ["DATA_PARALLEL_KINDS", "MeshReplicas", "refuse_under_mesh", "split_mesh"]
