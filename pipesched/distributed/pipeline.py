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

from pipesched.distributed.agreement import agree_on_options, policy_name
from pipesched.distributed.clock import measure_clock_offset
from pipesched.distributed.comm import Communicator
from pipesched.distributed.dp_deadline import bounded_dp_mesh
from pipesched.distributed.errors import PeerLost, RemoteStepError
from pipesched.distributed.mesh_parallel import MeshReplicas, refuse_under_mesh, split_mesh
from pipesched.distributed.grad_norm import clip_grad_norm_across
from pipesched.distributed.model_keys import ModelKeyedState
from pipesched.distributed.outcome import merged_costs
from pipesched.distributed.ownership import own_stages
from pipesched.distributed.step_frame import StepFrame
from pipesched.distributed.traced import model_layout
from pipesched.runtime.backward_half import backward_into_inputs
from pipesched.runtime.data_parallel import DataParallelReplicas, check_data_parallel_group
from pipesched.runtime.grad_scaling import backward_seed, poison_gradients
from pipesched.runtime.host_buffer import refuse_sparse_gradients
from pipesched.observe.report import CommRecord, StepReport
from pipesched.plan.schedule import Schedule
from pipesched.runtime.batchnorm import convert_deferred_batch_norm
from pipesched.runtime.checkpoint import CheckpointPolicy
from pipesched.runtime.compiling import compile_callback, compile_refused, compile_stages
from pipesched.runtime.loss_normalizer import LossNormalizer
from pipesched.runtime.microbatch import gather
from pipesched.runtime.options import check_flag, grad_disabled, missing_loss_fn
from pipesched.runtime.partition import resolve_device
from pipesched.runtime.pipeline_module import PipelineModule
from pipesched.runtime.runner import SplitBatch, StepOptions, StepRunner
from pipesched.runtime.step_effects import StepEffects
from pipesched.runtime.structure import unflatten
from pipesched.runtime.tasks import StepContext, StepInputs


class DistributedPipeline(StepFrame, ModelKeyedState, PipelineModule):
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
        group: the process group (default: the world). Backend: gloo.
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
        backend = dist.get_backend(group)
        if backend != "gloo":
            raise NotImplementedError(
                f"DistributedPipeline supports the gloo backend (tensors staged through host "
                f"memory); the process group uses {backend!r}. Initialise it with 'gloo'"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        values, refused, traced = None, None, None
        try:  # this rank's own arguments first; a refusal still joins the agreement below
            if data_parallel_group is not None:
                check_data_parallel_group(data_parallel_group)  # before any thread starts
                # every rank checks the whole model (a dict: its own stages), so all refuse alike
                parts = module.values() if isinstance(module, Mapping) else [module]
                refuse_sparse_gradients([m for m in parts if isinstance(m, nn.Module)], "data_parallel_group")
            if dp_mesh is not None:
                parts = module.values() if isinstance(module, Mapping) else [module]
                refuse_under_mesh([m for m in parts if isinstance(m, nn.Module)], loss_fn, deferred_batch_norm)
            options = StepOptions.check(
                schedule=schedule, chunks=chunks, checkpoint=checkpoint, loss_fn=loss_fn,
                loss_normalizer=loss_normalizer, deferred_batch_norm=deferred_batch_norm,
                stall_timeout=stall_timeout, log_tasks=log_tasks, activation_meter=activation_meter,
            )
            self.gather_timeline = check_flag("gather_timeline", gather_timeline)
            layout, traced = model_layout(module, balance, num_stages, options.schedule, self.rank, self.num_ranks,
                                          split_points=split_points, forward_kwargs=forward_kwargs,
                                          example_inputs=example_inputs, deferred_batch_norm=deferred_batch_norm)
            values = {"schedule": options.schedule.name, "chunks": options.chunks, "balance": layout.balance,
                      "num_stages": layout.num_stages, "placement": layout.placement,
                      "split_points": traced.split_points if traced else None,
                      "checkpoint": policy_name(options.checkpoint), "deferred_batch_norm": deferred_batch_norm,
                      "gather_timeline": self.gather_timeline, "data_parallel_group": data_parallel_group is not None,
                      "data_parallel": data_parallel if dp_mesh is not None else None}
        except Exception as error:  # noqa: BLE001 - raised after the agreement, so no rank waits for this one
            refused = error
        agree_on_options(values, refused, self.rank, self.num_ranks, group)  # raises on every rank if any differ
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
        if dp_mesh is not None and self._tied:  # every rank sees the same model: all refuse alike, no thread yet
            raise NotImplementedError("weights tied across pipeline ranks are not supported with a mesh that has "
                                      "a 'dp' dimension yet: use group=/data_parallel_group=")
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
        self.local_stages = nn.ModuleDict({str(s): m for s, m in own.items()})
        self._replicas, self._mesh = None, None
        if dp_mesh is not None:
            shape = tuple((s, sum(p.numel() for p in m.parameters())) for s, m in sorted(own.items()))
            self._mesh = MeshReplicas(bounded_dp_mesh(dp_mesh, options.stall_timeout), data_parallel, own,
                                      (self.rank, tuple(self.placement), shape))
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

    # ------------------------------------------------------------------ step

    def step(self, inputs: Tensor | tuple[Tensor, ...] | None = None,
             targets: Tensor | tuple[Tensor, ...] | None = None, *, scaler: Any = None) -> Tensor:
        """Forward and backward of the whole batch; returns the loss on every rank.

        Call it on every rank. ``inputs`` matter on the rank owning stage 0,
        ``targets`` on the rank owning the last stage; other ranks may pass
        ``None``. Gradients accumulate into this rank's parameters and equal
        those of the single-process run; inputs that require grad get their
        ``.grad`` on stage 0's rank, written as ``Pipeline.step`` writes it.
        An error on any rank is raised on every rank: the original exception
        where it happened, a
        :class:`~pipesched.distributed.errors.RemoteStepError` naming it elsewhere.
        A rank that dies or stops answering raises
        :class:`~pipesched.distributed.errors.PeerLost` within about ``stall_timeout``,
        and the pipeline is then unusable.

        Three phases, each its own method (:mod:`pipesched.distributed.step_frame`):
        agree on the batch size (a broadcast from stage 0's rank), run this rank's share of the plan
        (sending and receiving as the lowering says), share every rank's
        outcome (an all-gather, so errors and the loss reach every rank).

        ``scaler``: a ``torch.amp.GradScaler`` (one per process) for float16
        loss scaling, as for :meth:`Pipeline.step <pipesched.Pipeline.step>`.
        Each process's scaler checks only its own gradients, so a process
        whose gradients are all finite would step while another skips, and
        the model would come apart. So the end-of-step exchange also says
        whether any rank's gradients hold an inf or NaN, and if one does,
        every rank's gradients are made NaN: every scaler then skips the
        step and backs off alike, as the un-pipelined model's one scaler
        does.
        """
        if torch.compiler.is_compiling() or compile_callback() not in (None, False):
            raise compile_refused("DistributedPipeline")  # inline on purpose: see pipesched.runtime.compiling
        if self._broken is not None:
            raise RuntimeError(f"this pipeline is unusable after {self._broken}; restart the job")
        if not torch.is_grad_enabled():
            raise grad_disabled()
        last = self.placement[-1]
        if self._mesh is not None:
            if scaler is not None:
                raise NotImplementedError("scaler= is not supported with a mesh that has a 'dp' dimension yet")
            self._unshard_mesh()  # first, on every replica: a collective no failure may skip
        try:
            statuses, effects, ctx, split, comm = self._train(inputs, targets, scaler)
        except BaseException:
            self._replicas_failed()
            if self._mesh is not None and self._broken is None:
                self._mesh.fail()
            raise
        value, dtype = statuses[last]["loss"]
        if self._replicas is not None:
            value = self._reduce_replicas(statuses[last], value, effects, ctx)
        if self._mesh is not None:
            value = self._reduce_mesh(statuses[last], value, effects, ctx)
        effects.commit()
        if self._replicas is not None:
            self._replicas.broadcast(self.local_stages)  # batch-norm statistics: the first replica's
        self._record(statuses, len(split.sizes), comm)
        if self._shares_costs(with_loss=True):  # every rank, the same merged table: the same next plan
            self._runner.learn_costs(merged_costs(statuses, self.placement))
        if self.rank == self.placement[0]:  # the inputs' .grad, as Pipeline.step writes it
            backward_into_inputs(split.tensors, ctx, split.sizes)
        return torch.tensor(value, dtype=dtype)

    def _train(self, inputs: Any, targets: Any, scaler: Any
               ) -> tuple[list[Any], StepEffects, StepContext, SplitBatch, list[CommRecord]]:
        """This pipeline's step, up to (not including) the commit of its gradients."""
        last = self.placement[-1]
        local_error = missing_loss_fn() if self.rank == last and self.loss_fn is None else None
        split, shapes, local_error = self._agree_on_batch(inputs, local_error)
        count = len(split.sizes)
        plan, lowering = self._runner.plan(count)
        io, local_error = self._step_inputs(split, targets, local_error)
        if local_error is None:
            try:
                io.loss_seed = backward_seed(scaler, self.device)
            except TypeError as error:  # raised on every rank, as any step error
                local_error = error
        ctx = self._runner.context(lowering, keep=True, io=io, clock_offset=self.clock_offset)
        # under a mesh the stages are gathered now: their .grad is FSDP's, the optimizer's are the shards'
        effects = self._runner.effects(self._mesh.parameters if self._mesh is not None else self.parameters())
        records, local_error, comm = self._run_plan(plan, ctx, effects, local_error, shapes)
        statuses = self._share_outcome(ctx, records, local_error, effects, scaled=io.loss_seed is not None)
        if any(s["nonfinite"] for s in statuses):
            poison_gradients(self.parameters())  # every rank's scaler skips this step alike
        self._reduce_tied(effects)
        return statuses, effects, ctx, split, comm

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
        if self._mesh is not None:
            raise NotImplementedError("clip_grad_norm_ is not supported with a mesh that has a 'dp' dimension yet")
        elsewhere = self._tied.counted_elsewhere(self._global(self.rank)) if self._tied else set()
        return clip_grad_norm_across(self.parameters(), max_norm, norm_type, error_if_nonfinite, self.group,
                                     elsewhere)

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
