"""The same schedules, one process per rank, on ``torch.distributed`` (launched with torchrun).

::

    torch.distributed.init_process_group("gloo")          # torchrun sets the environment
    pipe = DistributedPipeline(model, schedule="1f1b", chunks=8, loss_fn=nn.CrossEntropyLoss())
    loss = pipe.step(inputs, targets)    # same call on every rank; loss returned on every rank
    optimizer.step()                     # optimizer over pipe.parameters(): this rank's stages

Each process is one rank of the plan and builds only the stages its placement
gives it: pass the full ``nn.Sequential`` (each rank keeps its own stages and
drops the rest), or a ``{stage: module}`` dict of just this rank's stages with
``num_stages`` (for models that do not fit on one host). Everything above the
transport is shared with the single-process :class:`~pipesched.Pipeline`: the
schedule plug-ins and plan validation, the orchestrator and executor, the
checkpoint manager, the timeline. Every process computes the same plan, and
the messages each rank exchanges are derived from it
(:mod:`pipesched.distributed.comm`).

Per step, two small collectives frame the point-to-point traffic: the rank
owning stage 0 broadcasts the batch size and a checksum of the input shapes
(so every rank builds the same plan and micro-batch split, and both ends of
a message know its shape), and at the end every rank shares a few numbers
(whether it succeeded, the loss, its memory peaks: an error anywhere is
raised everywhere, and the loss reaches every rank;
:mod:`pipesched.distributed.outcome`).

``pipe.last_report`` on each rank holds that rank's own tasks (on rank 0's
clock) and every rank's memory figures. ``gather_timeline=True`` gathers
every rank's tasks into every rank's report, one more collective per step;
or merge the per-rank JSON-lines logs afterwards
(``Timeline.from_jsonl([...])``), which costs the step nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipesched.distributed.arguments import agreed_arguments
from pipesched.distributed.clock import measure_clock_offset
from pipesched.distributed.comm import Communicator
from pipesched.distributed.dp_deadline import bounded_dp_mesh
from pipesched.distributed.errors import PeerLost, RemoteStepError
from pipesched.distributed.grad_norm import clip_grad_norm_across
from pipesched.distributed.mesh_parallel import MeshReplicas, split_mesh
from pipesched.distributed.model_keys import ModelKeyedState
from pipesched.distributed.ownership import own_stages
from pipesched.distributed.staging import check_backend
from pipesched.distributed.training_step import TrainingStep
from pipesched.observe.report import CommRecord, StepReport
from pipesched.plan.schedule import Schedule
from pipesched.runtime.batchnorm import convert_deferred_batch_norm
from pipesched.runtime.checkpoint import CheckpointPolicy
from pipesched.runtime.compiling import compile_callback, compile_refused, compile_stages
from pipesched.runtime.data_parallel import DataParallelReplicas
from pipesched.runtime.loss_normalizer import LossNormalizer
from pipesched.runtime.microbatch import gather
from pipesched.runtime.partition import resolve_device
from pipesched.runtime.pipeline_module import PipelineModule
from pipesched.runtime.runner import StepRunner
from pipesched.runtime.structure import unflatten
from pipesched.runtime.tasks import StepInputs


class DistributedPipeline(TrainingStep, ModelKeyedState, PipelineModule):
    """One rank of a multi-process pipeline. ``parameters()`` are this rank's stages' only.

    Args:
        module: the full ``nn.Sequential`` (every rank keeps only its stages;
            a parameter shared by stages of different ranks, such as a tied
            embedding and head, is kept as one copy per rank whose gradients
            are summed across those ranks after each backward, see
            :mod:`pipesched.distributed.tied`), or a
            dict ``{stage_index: module}`` holding exactly the stages the
            schedule places on this rank (then ``num_stages`` is required),
            or any other ``nn.Module`` (a Hugging Face causal LM), traced and
            cut as :class:`~pipesched.Pipeline` cuts it, every rank keeping
            its own stages (see :mod:`pipesched.distributed.traced`).
        split_points, forward_kwargs, example_inputs: for a model that is not
            an ``nn.Sequential``, as for :class:`~pipesched.Pipeline`.
        balance: layers per stage, with a full ``nn.Sequential`` (blocks per
            stage for a traced model); default: the schedule's stage count
            for the world size, split evenly.
        num_stages: total number of stages, with a dict of stages.
        schedule, chunks, checkpoint, loss_fn, loss_normalizer, deferred_batch_norm, stall_timeout, log_tasks, activation_meter: as for
            :class:`~pipesched.Pipeline` (``loss_fn`` and ``loss_normalizer``
            are called on the last stage's rank only, where the targets are;
            ``log_tasks=False`` also silences the ``"comm"`` events).
        gather_timeline: gather every rank's task records into every
            rank's ``last_report`` after each step (one more collective
            per step). Default: each rank's report holds its own tasks.
        device: this rank's device (default ``"cpu"``).
        group: the process group (default: the world). Backend: gloo, or a combined
            ``"cpu:gloo,cuda:nccl"`` (``init_process_group()``'s default with GPUs), whose messages then
            travel over NCCL on the GPU (see :mod:`pipesched.distributed.staging`).
        data_parallel_group: with several pipelines of the same model (each
            on its own ``group``, each fed its part of the global batch), the
            group of the processes holding this process's stages in every
            pipeline. Every step then leaves every replica the gradients and
            the loss of the global batch (see
            :mod:`pipesched.runtime.data_parallel`). Default: one pipeline.
        mesh: a ``DeviceMesh`` with a dimension ``"pp"`` and optionally
            ``"dp"``, instead of ``group``/``data_parallel_group``: the
            pipeline runs over ``mesh["pp"]`` and torch replicates each
            rank's stages over ``mesh["dp"]`` (see
            :mod:`pipesched.distributed.mesh_parallel`).
        data_parallel: with a ``"dp"`` dimension, ``"fsdp"`` (FSDP2
            ``fully_shard`` per stage) or ``"ddp"`` (``replicate``).

    Every rank must pass the same options: the constructor compares them
    across ranks (:mod:`pipesched.distributed.agreement`) and raises on every
    rank, naming each option that differs, before anything runs.
    """

    def __init__(
        self,
        module: nn.Module | Mapping[int, nn.Module],
        *,
        split_points: Sequence[str] | None = None,
        forward_kwargs: Mapping[str, Any] | None = None,
        example_inputs: Mapping[str, Tensor] | None = None,
        balance: Sequence[int] | None = None,
        num_stages: int | None = None,
        schedule: str | Schedule = "gpipe",
        chunks: int = 1,
        checkpoint: CheckpointPolicy = "except_last",
        loss_fn: Any = None,
        loss_normalizer: LossNormalizer | None = None,
        device: str | torch.device = "cpu",
        group: Any = None,
        deferred_batch_norm: bool = False,
        stall_timeout: float | None = 600.0,
        log_tasks: bool = True,
        gather_timeline: bool = False,
        activation_meter: str = "once",
        data_parallel_group: Any = None,
        mesh: Any = None,
        data_parallel: str = "fsdp",
    ):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedPipeline needs torch.distributed: call "
                "torch.distributed.init_process_group('gloo') first (torchrun sets its environment)"
            )
        group, dp_mesh = split_mesh(mesh, data_parallel, group, data_parallel_group)  # same on every rank
        check_backend(dist.get_backend(group), resolve_device(device))  # the same backend on every rank
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        checked = agreed_arguments(
            module, balance=balance, num_stages=num_stages, data_parallel_group=data_parallel_group,
            dp_mesh=dp_mesh, data_parallel=data_parallel, gather_timeline=gather_timeline, rank=self.rank,
            num_ranks=self.num_ranks, group=group, schedule=schedule, chunks=chunks, checkpoint=checkpoint,
            loss_fn=loss_fn, loss_normalizer=loss_normalizer, deferred_batch_norm=deferred_batch_norm,
            stall_timeout=stall_timeout, log_tasks=log_tasks, activation_meter=activation_meter,
            split_points=split_points, forward_kwargs=forward_kwargs, example_inputs=example_inputs,
        )  # raises on every rank if any rank refused its arguments or any differ
        traced = checked.traced
        options, layout, self.gather_timeline = checked.options, checked.layout, checked.gather_timeline
        # layers per stage, the same on every rank, as Pipeline.balance (None: built from this rank's own stages)
        self.balance = None if layout.balance is None else list(layout.balance)
        self.chunks = options.chunks
        self._stall_timeout = options.stall_timeout
        self.schedule = options.schedule
        self.loss_fn = loss_fn
        self.loss_normalizer = options.loss_normalizer
        self.device = resolve_device(device)

        ownership = (traced.own(layout, self.rank, group, self._global, self.device) if traced
                     else own_stages(module, layout, self.rank, group, self._global))
        self._traced = traced  # a plain object: its model is not registered as this module's submodule
        self._input_check = traced.check_inputs if traced else None
        self.num_stages, self.placement = ownership.num_stages, ownership.placement
        self._skips, self._tied = ownership.skips, ownership.tied
        self._layer_stage, self._foreign_layers = ownership.layer_stage, ownership.foreign_layers
        own = ownership.stages
        self._stages: list[nn.Module | None] = [own.get(s) for s in range(self.num_stages)]
        self._runner = StepRunner(options, self._stages, self.placement, [self.device] * self.num_ranks,
                                  ranks=[self.rank], skips=self._skips)
        if deferred_batch_norm:
            for stage in own.values():
                convert_deferred_batch_norm(stage)
        for stage in own.values():
            stage.to(self.device)
        if self._tied:
            self._tied.broadcast_values()  # tied copies start equal, whatever each process's seed
            if dp_mesh is not None:
                self._tied.locate(own)  # FSDP2 is about to replace the parameter objects
        self.local_stages = nn.ModuleDict({str(s): m for s, m in own.items()})
        self._replicas, self._mesh = None, None
        if dp_mesh is not None:
            shape = tuple((s, sum(p.numel() for p in m.parameters())) for s, m in sorted(own.items()))
            loss_parameters = list(loss_fn.parameters()) if isinstance(loss_fn, nn.Module) else []
            self._mesh = MeshReplicas(bounded_dp_mesh(dp_mesh, options.stall_timeout), data_parallel, own,
                                      (self.rank, tuple(self.placement), shape),
                                      loss_parameters, holds_loss=self.rank == self.placement[-1])
        if data_parallel_group is not None:
            stages = (self.rank, self.num_stages, tuple(self.placement),
                      tuple((s, sum(p.numel() for p in m.parameters())) for s, m in sorted(own.items())))
            self._replicas = DataParallelReplicas(data_parallel_group, stages, self)  # stages and loss_fn start equal
        self._comm = Communicator(group, self.rank, self.num_ranks, self.device)
        self._finalizer = weakref.finalize(self, _close, self._runner, self._comm)
        self.clock_offset = measure_clock_offset(self.group, self.rank, self.num_ranks, self._global)
        self._steps = 0
        self._broken: str | None = None
        self.last_report: StepReport | None = None
        self.last_comm: list[CommRecord] = []

    def forward(self, inputs: Tensor | tuple[Tensor, ...] | None = None) -> Any:
        """Forward half only, on every rank; the output comes back on the last stage's rank.

        Call it on every rank (``inputs`` matter on stage 0's rank). Returns
        the gathered output (a Tensor, tuple or mapping, as the last stage
        returns it) on the rank owning the last stage and ``None`` elsewhere.
        Nothing is kept for a backward: train with :meth:`step`.
        """
        if torch.compiler.is_compiling() or compile_callback() not in (None, False):
            raise compile_refused("DistributedPipeline")  # inline on purpose: see pipesched.runtime.compiling
        if self._broken is not None:
            raise RuntimeError(f"this pipeline is unusable after {self._broken}; restart the job")
        if self._mesh is not None:
            self._unshard_mesh()  # first, on every replica
            try:
                return self._forward(inputs)
            finally:
                self._mesh.reshard()
        return self._forward(inputs)

    def _forward(self, inputs: Any) -> Any:
        split, shapes, local_error = self._agree_on_batch(inputs, None)
        count = len(split.sizes)
        plan, lowering = self._runner.plan(count, "F")
        io = StepInputs(split.microbatches if self.rank == self.placement[0] else [])
        with torch.no_grad():
            ctx = self._runner.context(lowering, keep=False, io=io, clock_offset=self.clock_offset)
            effects = self._runner.effects(())
            records, local_error, comm = self._run_plan(plan, ctx, effects, local_error, shapes)
        statuses = self._share_outcome(ctx, records, local_error, effects, with_loss=False)
        effects.commit()  # deferred batch norms in training mode, as for Pipeline's pipe(x)
        self._record(statuses, count, comm)
        if self.rank != self.placement[-1]:
            return None
        parts = [ctx.results.outputs[m][0] for m in range(count)]
        return unflatten(gather(parts), ctx.results.outputs[0][1])

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model's gradients, on every rank.

        Call it on every rank after ``step()``, before ``optimizer.step()``.
        Clipping ``pipe.parameters()`` with torch's function would use this
        rank's norm only; this one all-reduces the norm over the processes
        (a tied weight counted once) and scales every rank's gradients by the
        same factor. Returns the total norm (float64), the same on every rank.
        See :mod:`pipesched.distributed.grad_norm`.
        """
        elsewhere = self._tied.counted_elsewhere(self._global(self.rank)) if self._tied else set()
        sharded = self._mesh.group if self._mesh is not None and self._mesh.kind == "fsdp" else None
        if sharded is not None and dist.get_rank(sharded) != 0:  # the loss's parameters: whole on every replica
            elsewhere |= {id(p) for p in self._mesh.loss_parameters}
        return clip_grad_norm_across(self.parameters(), max_norm, norm_type, error_if_nonfinite, self.group,
                                     elsewhere, sharded_over=sharded)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile this rank's stages in place with ``torch.compile(*args, **kwargs)``.

        Call it on every rank (each compiles its own stages). ``torch.compile``
        of the pipeline itself is refused, see :mod:`pipesched.runtime.compiling`.
        """
        compile_stages(self._stages, [self.device] * self.num_stages, *args, **kwargs)

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop this rank's threads (the process group stays yours to destroy). Idempotent.

        A pipeline that is garbage-collected stops them too.
        """
        if self._broken:  # after a lost rank a receiver may be blocked for good on it: don't wait
            self._comm.close(timeout=0)
        self._finalizer()

    def __enter__(self) -> DistributedPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _close(runner: StepRunner, comm: Communicator) -> None:
    runner.close()
    comm.close()


__all__ = ["DistributedPipeline", "PeerLost", "RemoteStepError"]
