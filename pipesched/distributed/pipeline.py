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

from pipesched.distributed.clock import measure_clock_offset, shift_comm, shifted
from pipesched.distributed.comm import Communicator
from pipesched.runtime.data_parallel import DataParallelReplicas, check_data_parallel_group
from pipesched.runtime.grad_scaling import backward_seed, gradients_finite, poison_gradients
from pipesched.distributed.errors import PeerLost, RemoteStepError, describe
from pipesched.distributed.grad_norm import clip_grad_norm_across
from pipesched.distributed.inbound import shape_checksum
from pipesched.distributed.outcome import cost_row, exchange_statuses, failure, merged_costs, status_row
from pipesched.distributed.ownership import own_stages
from pipesched.observe.report import CommRecord, StepReport
from pipesched.plan.action import Plan
from pipesched.plan.costs import median_costs
from pipesched.plan.record import TaskRecord
from pipesched.plan.schedule import Schedule
from pipesched.runtime.batchnorm import convert_deferred_batch_norm
from pipesched.runtime.checkpoint import CheckpointPolicy, RankMemory
from pipesched.runtime.compiling import compile_callback, compile_refused, compile_stages
from pipesched.runtime.loss_leaves import OTHER_RANKS
from pipesched.runtime.loss_normalizer import LossNormalizer, batch_loss
from pipesched.runtime.microbatch import as_tensors, batch_size, gather
from pipesched.runtime.options import check_flag, grad_disabled, missing_loss_fn
from pipesched.runtime.orchestrator import StepStalled
from pipesched.runtime.partition import resolve_device
from pipesched.runtime.pipeline_module import PipelineModule
from pipesched.runtime.runner import SplitBatch, StepOptions, StepRunner
from pipesched.runtime.state_dict import route_to_layers, without_layers
from pipesched.runtime.step_effects import StepEffects
from pipesched.runtime.structure import unflatten
from pipesched.runtime.tasks import StepContext, StepInputs


class DistributedPipeline(PipelineModule):
    """One rank of a multi-process pipeline. ``parameters()`` are this rank's stages' only.

    Args:
        module: the full ``nn.Sequential`` (every rank keeps only its stages;
            a parameter shared by stages of different ranks, such as a tied
            embedding and head, is kept as one copy per rank whose gradients
            are summed across those ranks after each backward, see
            :mod:`pipesched.distributed.tied`), or a
            dict ``{stage_index: module}`` holding exactly the stages the
            schedule places on this rank (then ``num_stages`` is required).
        balance: layers per stage, with a full ``nn.Sequential``; default: the
            schedule's stage count for the world size, split evenly.
        num_stages: total number of stages, with a dict of stages.
        schedule, chunks, checkpoint, loss_fn, loss_normalizer,
        deferred_batch_norm, stall_timeout, log_tasks, activation_meter: as for
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
            :mod:`pipesched.distributed.data_parallel`). Default: one pipeline.
    """

    def __init__(
        self,
        module: nn.Sequential | Mapping[int, nn.Module],
        *,
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
    ):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedPipeline needs torch.distributed: call "
                "torch.distributed.init_process_group('gloo') first (torchrun sets its environment)"
            )
        backend = dist.get_backend(group)
        if backend != "gloo":
            raise NotImplementedError(
                f"DistributedPipeline supports the gloo backend (tensors staged through host "
                f"memory); the process group uses {backend!r}. Initialise it with 'gloo'"
            )
        if data_parallel_group is not None:
            check_data_parallel_group(data_parallel_group)  # before any thread starts
        options = StepOptions.check(
            schedule=schedule, chunks=chunks, checkpoint=checkpoint, loss_fn=loss_fn,
            loss_normalizer=loss_normalizer, deferred_batch_norm=deferred_batch_norm,
            stall_timeout=stall_timeout, log_tasks=log_tasks, activation_meter=activation_meter,
        )
        self.chunks = options.chunks
        self.gather_timeline = check_flag("gather_timeline", gather_timeline)
        self._stall_timeout = options.stall_timeout
        self.schedule = options.schedule
        self.loss_fn = loss_fn
        self.loss_normalizer = options.loss_normalizer
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = resolve_device(device)

        ownership = own_stages(module, balance, num_stages, self.schedule, self.rank, self.num_ranks, group,
                               self._global)
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
        self.local_stages = nn.ModuleDict({str(s): m for s, m in own.items()})
        layout = (self.rank, self.num_stages, tuple(self.placement),
                  tuple((s, sum(p.numel() for p in m.parameters())) for s, m in sorted(own.items())))
        self._replicas = (DataParallelReplicas(data_parallel_group, layout, self)  # stages and loss_fn start equal
                          if data_parallel_group is not None else None)
        self._comm = Communicator(group, self.rank, self.num_ranks, self.device)
        self._finalizer = weakref.finalize(self, _close, self._runner, self._comm)
        self.clock_offset = measure_clock_offset(self.group, self.rank, self.num_ranks, self._global)
        self._steps = 0
        self._broken: str | None = None
        self.last_report: StepReport | None = None
        self.last_comm: list[CommRecord] = []

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    # ------------------------------------------------------------------ step

    def step(self, inputs: Tensor | tuple[Tensor, ...] | None = None,
             targets: Tensor | tuple[Tensor, ...] | None = None, *, scaler: Any = None) -> Tensor:
        """Forward and backward of the whole batch; returns the loss on every rank.

        Call it on every rank. ``inputs`` matter on the rank owning stage 0,
        ``targets`` on the rank owning the last stage; other ranks may pass
        ``None``. Gradients accumulate into this rank's parameters and equal
        those of the single-process run. An error on any rank is raised on
        every rank: the original exception where it happened, a
        :class:`~pipesched.distributed.errors.RemoteStepError` naming it elsewhere.
        A rank that dies or stops answering raises
        :class:`~pipesched.distributed.errors.PeerLost` within about ``stall_timeout``,
        and the pipeline is then unusable.

        Three phases, each its own method: agree on the batch size
        (a broadcast from stage 0's rank), run this rank's share of the plan
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
        try:
            statuses, effects, count, comm = self._train(inputs, targets, scaler)
        except BaseException:
            self._replicas_failed()
            raise
        value, dtype = statuses[last]["loss"]
        if self._replicas is not None:
            value = self._reduce_replicas(statuses[last], value, effects)
        effects.commit()
        if self._replicas is not None:
            self._replicas.broadcast(self.local_stages)  # batch-norm statistics: the first replica's
        self._record(statuses, count, comm)
        if self._shares_costs(with_loss=True):  # every rank, the same merged table: the same next plan
            self._runner.learn_costs(merged_costs(statuses, self.placement))
        return torch.tensor(value, dtype=dtype)

    def _train(self, inputs: Any, targets: Any, scaler: Any) -> tuple[list[Any], StepEffects, int, list[CommRecord]]:
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
        effects = self._runner.effects(self.parameters())
        records, local_error, comm = self._run_plan(plan, ctx, effects, local_error, shapes)
        statuses = self._share_outcome(ctx, records, local_error, effects, scaled=io.loss_seed is not None)
        if any(s["nonfinite"] for s in statuses):
            poison_gradients(self.parameters())  # every rank's scaler skips this step alike
        self._reduce_tied(effects)
        return statuses, effects, count, comm

    def _reduce_replicas(self, last: Mapping[str, Any], loss: float, effects: StepEffects) -> float:
        """This step's gradients and loss combined with the other pipelines' (data parallelism)."""
        try:
            return self._replicas.reduce(True, last["normaliser"], loss, list(self.parameters()))[0]  # type: ignore[union-attr]
        except RemoteStepError:
            effects.rollback()
            raise
        except RuntimeError as error:  # a replica's process is gone
            effects.rollback()
            raise self._lose(PeerLost(f"a data-parallel replica is gone ({error})")) from error

    def _replicas_failed(self) -> None:
        """This pipeline's step failed: tell the other replicas, so none waits for this one."""
        if self._replicas is not None and self._broken is None:
            self._replicas.fail()

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

    def _agree_on_batch(self, inputs: Any, local_error: BaseException | None
                        ) -> tuple[SplitBatch, list[Any], BaseException | None]:
        """Every rank learns the batch size and shape from stage 0's rank, which also splits the inputs.

        One broadcast of three integers (rows, and a checksum of the inputs'
        dtypes and trailing shapes that keys the message specs); a refusal
        follows as a second broadcast carrying its text.
        """
        first = self.placement[0]
        announced = torch.zeros(3, dtype=torch.int64)  # status (0 ok, 1 refused), rows, shape checksum
        tensors: tuple[Tensor, ...] = ()
        refusal = ""
        if self.rank == first:
            try:
                tensors = as_tensors(inputs, "inputs")
                announced[1] = batch_size(tensors, "inputs")
                announced[2] = shape_checksum(tensors)
            except (TypeError, ValueError) as error:
                local_error = error
                announced[0] = 1
                refusal = f"{type(error).__name__}: {error}"
        try:
            dist.broadcast(announced, src=self._global(first), group=self.group)
            if announced[0]:
                message: list[Any] = [refusal]
                dist.broadcast_object_list(message, src=self._global(first), group=self.group)
        except RuntimeError as error:  # a rank died between steps: the group is broken
            raise self._lose(PeerLost(f"a rank is gone (start-of-step exchange failed: {error})")) from error
        if announced[0]:
            if self.rank == first:
                raise local_error  # type: ignore[misc]
            raise RemoteStepError(f"rank {first} (stage 0) refused the inputs: {message[0]}")
        rows, checksum = int(announced[1]), int(announced[2])
        split = self._runner.split_rows(tensors, rows, isinstance(inputs, Tensor))
        return split, [(size, checksum) for size in split.sizes], local_error

    def _step_inputs(self, split: SplitBatch, targets: Any, local_error: BaseException | None
                     ) -> tuple[StepInputs, BaseException | None]:
        """This rank's inputs: micro-batches on stage 0's rank, targets and loss weights on the last's."""
        io = StepInputs(split.microbatches if self.rank == self.placement[0] else [])
        if self.rank == self.placement[-1] and local_error is None:
            try:
                io.targets, io.loss_weights, io.normaliser = self._runner.split_targets(targets, split.sizes)
                io.loss_fn = self.loss_fn
                io.loss_leaves = (frozenset(map(id, self.parameters())), OTHER_RANKS)
            except Exception as error:  # noqa: BLE001 - incl. a user loss_normalizer's; raised on every rank
                local_error = error
        return io, local_error

    def _run_plan(self, plan: Plan, ctx: StepContext, effects: StepEffects, local_error: BaseException | None,
                  shapes: list[Any]) -> tuple[list[TaskRecord], BaseException | None, list[CommRecord]]:
        """Run this rank's actions; a failure anywhere is sent on as errors in place of messages."""
        link = self._comm.begin(self._steps, ctx.mailbox.lowering, ctx.mailbox, shapes)
        records: list[TaskRecord] = []
        try:
            if local_error is not None:
                raise local_error
            records = self._runner.orchestrator.run(plan, ctx)
        except StepStalled as error:
            self._broken = f"a stalled step ({error})"
            effects.rollback()
            raise
        except BaseException as error:  # noqa: BLE001 - reported to every rank below
            local_error = error
            self._comm.fail(link, describe(error, self.rank))
        gone = self._comm.finish(link, self._stall_timeout)
        self._steps += 1  # every step, failed or not, gets its own message tags
        if gone is not None or isinstance(local_error, PeerLost):
            # a rank died or stopped answering: no collective could complete, so skip the
            # status exchange (every reachable rank learns it from the error headers)
            effects.rollback()
            if isinstance(local_error, PeerLost):
                raise self._lose(local_error)
            self._lose(gone)  # type: ignore[arg-type]
            if local_error is not None and not isinstance(local_error, RemoteStepError):
                raise local_error  # this rank's own error comes first, as for any failed step
            raise gone  # type: ignore[misc]
        return records, local_error, link.records

    def _share_outcome(self, ctx: StepContext, records: list[TaskRecord], local_error: BaseException | None,
                       effects: StepEffects, with_loss: bool = True, scaled: bool = False) -> list[Any]:
        """Every rank's status; raises (after rolling back) if any rank failed.

        One all-gather of a few numbers per rank (ok, loss, memory) on the
        way every step takes; error texts only when a rank failed, and every
        rank's task records only with ``gather_timeline``.
        """
        loss = None
        if with_loss and local_error is None and self.rank == self.placement[-1]:
            count = ctx.mailbox.lowering.num_microbatches
            loss = batch_loss([ctx.results.losses[m] for m in range(count)], ctx.io.loss_weights)
        costs = cost_row(median_costs(records), self.num_stages) if self._shares_costs(with_loss) else None
        mine = status_row(local_error, ctx.checkpoint.memory[self.rank], loss, costs, ctx.io.normaliser,
                          nonfinite=scaled and local_error is None and not gradients_finite(self.parameters()))
        text = None if local_error is None else describe(local_error, self.rank)
        tasks = [r.as_dict() for r in shifted(records, self.clock_offset)]
        try:
            statuses = exchange_statuses(mine, text, tasks if self.gather_timeline else None, self.num_ranks,
                                         self.group)
        except RuntimeError as error:  # a rank died after its last message
            effects.rollback()
            raise self._lose(PeerLost(f"a rank is gone (end-of-step exchange failed: {error})")) from error
        if "tasks" not in statuses[self.rank]:
            statuses[self.rank]["tasks"] = tasks
        if local_error is not None or not all(s["ok"] for s in statuses):
            effects.rollback()
            if local_error is not None and not isinstance(local_error, RemoteStepError):
                raise local_error
            raise RemoteStepError(failure(statuses)) from local_error
        return statuses

    def _shares_costs(self, with_loss: bool) -> bool:
        """Whether this step's statuses carry measured costs: a training step of a schedule that wants
        them (``"auto"`` without ``costs=``). The same answer on every rank, so the rows match."""
        return with_loss and self.schedule.wants_costs

    def _reduce_tied(self, effects: StepEffects) -> None:
        """Sum the gradients of weights tied across ranks over their holders (every rank succeeded)."""
        if not self._tied:
            return
        try:
            self._tied.reduce_gradients()
        except RuntimeError as error:  # a holder died after the status exchange
            effects.rollback()
            raise self._lose(PeerLost(f"a rank is gone (tied-weight gradient exchange failed: {error})")) from error

    def _lose(self, error: PeerLost) -> PeerLost:
        """Mark the pipeline unusable: a rank is gone, messages of this step may be lost."""
        self._broken = f"losing a rank ({error})"
        return error

    def _record(self, statuses: list[Any], count: int, comm: list[CommRecord]) -> None:
        tasks = sorted(
            (TaskRecord(**t) for s in statuses for t in s.get("tasks", ())), key=lambda r: (r.start, r.rank)
        )
        memory = [RankMemory(s["held_bytes"], s["peak_bytes"], 0, s["peak_inflight"]) for s in statuses]
        self.last_report = self._runner.report(count, tasks, memory)
        self.last_comm = [shift_comm(c, self.clock_offset) for c in comm]
        self._runner.log_memory(memory)  # this rank's "memory" event, beside its "task" events
        if self.log_tasks:
            step = self._orchestrator.steps - 1
            self._orchestrator.events.emit("comm", (
                {"step": step, "schedule": self.schedule.name, **record.as_dict()} for record in self.last_comm
            ))

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
        return clip_grad_norm_across(self.parameters(), max_norm, norm_type, error_if_nonfinite, self.group,
                                     elsewhere)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile this rank's stages in place with ``torch.compile(*args, **kwargs)``.

        Call it on every rank (each compiles its own stages). ``torch.compile``
        of the pipeline itself is refused, see :mod:`pipesched.runtime.compiling`.
        """
        compile_stages(self._stages, [self.device] * self.num_stages, *args, **kwargs)

    # ------------------------------------------------------------ state dict

    def _owned_layers(self) -> nn.Sequential:
        """This rank's layers under their names in the full model (a view; nothing is copied)."""
        layers = nn.Sequential()
        for name, stage in self._layer_stage.items():  # in model order
            layers.add_module(name, self.local_stages[str(stage)]._modules[name])
        return layers

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """This rank's part of the model's state dict, under the model's own keys.

        Built from a full ``nn.Sequential``: the entries of the layers this
        rank owns, keyed as in ``model.state_dict()``, so the parts of all
        ranks together are the model's state dict. Built from a dict of
        stages: the default ``local_stages.<stage>.…`` keys.
        """
        if not self._layer_stage:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        return self._owned_layers().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load this rank's layers from the model's (full or partial) state dict.

        Entries of layers other ranks own are ignored; with ``strict``, every
        key of this rank's layers must be present and no key may name
        something the model does not have, as for ``model.load_state_dict``.
        """
        if not self._layer_stage:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return self._owned_layers().load_state_dict(
            without_layers(state_dict, self._foreign_layers), strict=strict, assign=assign
        )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Loading through a module that holds this pipeline: model keys to ``local_stages`` paths."""
        if self._layer_stage:
            routes = {name: f"local_stages.{stage}." for name, stage in self._layer_stage.items()}
            route_to_layers(state_dict, prefix, routes, drop=self._foreign_layers)
        super()._load_from_state_dict(state_dict, prefix, *args)

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
