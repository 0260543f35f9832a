"""The transport frame of one step of a :class:`~pipesched.distributed.DistributedPipeline`.

The step itself (plan, context, orchestrator, gradients held until commit)
is the :class:`~pipesched.runtime.runner.StepRunner`'s, shared with the
single-process pipeline. What only a process of a multi-process pipeline
does lives here, one method per phase, each with its own collective and its
own answer to "what if a rank is gone now":

* agree on the batch (a broadcast from stage 0's rank);
* this rank's inputs (micro-batches on stage 0's rank, targets on the last's);
* run this rank's share of the plan, sending and receiving as the lowering
  says; a failure is sent on as errors in place of messages;
* share every rank's outcome (an all-gather: errors and the loss reach every rank);
* sum tied weights' gradients over their holders, combine data-parallel replicas;
* record the step's report and ``"comm"`` events.

A rank found gone in any phase marks the pipeline unusable (:meth:`StepFrame._lose`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist

from pipesched.distributed.agreement import agree_on_batch
from pipesched.distributed.clock import shift_comm, shifted
from pipesched.distributed.errors import PeerLost, RemoteStepError, describe
from pipesched.distributed.outcome import cost_row, exchange_statuses, failure, status_row
from pipesched.observe.report import CommRecord
from pipesched.plan.action import Plan
from pipesched.plan.costs import median_costs
from pipesched.plan.record import TaskRecord
from pipesched.runtime.checkpoint import RankMemory
from pipesched.runtime.data_parallel import combine_replicas
from pipesched.runtime.grad_scaling import gradients_finite
from pipesched.runtime.loss_leaves import OTHER_RANKS
from pipesched.runtime.loss_normalizer import batch_loss
from pipesched.runtime.orchestrator import StepStalled
from pipesched.runtime.runner import SplitBatch
from pipesched.runtime.step_effects import StepEffects
from pipesched.runtime.tasks import StepContext, StepInputs


class StepFrame:
    """Mixin of :class:`~pipesched.distributed.DistributedPipeline`: the phases of a step that talk to
    other processes. The attributes it reads (``rank``, ``placement``, ``group``, ``_runner``,
    ``_comm``, ``_replicas``, ``_tied``, …) are the pipeline's, set in its constructor."""

    rank: int
    num_ranks: int
    num_stages: int
    placement: list[int]
    group: Any
    gather_timeline: bool
    clock_offset: float
    _broken: str | None
    _steps: int
    _input_check: Callable[[Any], None] | None  # a traced model's check of stage 0's inputs

    def _global(self, rank: int) -> int:
        """Rank ``rank`` of the pipeline's group as a rank of the world (what collectives name)."""
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _reduce_replicas(self, last: Mapping[str, Any], loss: float, effects: StepEffects,
                         ctx: StepContext) -> float:
        """This step's gradients, inputs' gradients and loss combined with the other pipelines'
        (data parallelism), by the function ``Pipeline.step`` uses."""
        return self._across_replicas(
            lambda: combine_replicas(self._replicas, ctx, last["normaliser"], loss,  # type: ignore[arg-type]
                                     list(self.parameters())),
            effects, "a data-parallel replica")

    def _reduce_mesh(self, last: Mapping[str, Any], loss: float, effects: StepEffects, ctx: StepContext,
                     scaled: bool = False) -> float:
        """This step's gradients summed by FSDP over ``mesh["dp"]``, each replica weighted by its share
        (:meth:`~pipesched.distributed.mesh_parallel.MeshReplicas.reduce`); the global batch's loss.
        ``scaled`` (a ``GradScaler``): then whether any shard anywhere is inf or NaN is agreed over
        pp x dp, so that every process's scaler skips alike."""
        def reduce() -> float:
            value = self._mesh.reduce(last["normaliser"], loss, ctx)  # type: ignore[attr-defined]
            if scaled:
                self._mesh.agree_nonfinite(self.group)  # type: ignore[attr-defined]
            return value

        return self._across_replicas(reduce, effects, "a data-parallel replica (mesh['dp'])")

    def _unshard_mesh(self) -> None:
        """FSDP's all-gather over ``mesh["dp"]`` that opens a mesh step; a replica gone (or silent for
        ``stall_timeout``, :mod:`~pipesched.distributed.dp_deadline`) marks the pipeline unusable."""
        try:
            self._mesh.unshard()  # type: ignore[attr-defined]
        except RuntimeError as error:
            raise self._lose(PeerLost(f"a data-parallel replica (mesh['dp']) is gone (start-of-step "
                                      f"all-gather failed: {error})")) from error

    def _across_replicas(self, reduce: Callable[[], float], effects: StepEffects, who: str) -> float:
        """Run the replicas' exchange ``reduce``; a replica's failure rolls this step back, and a lost
        process marks the pipeline unusable."""
        try:
            return reduce()
        except RemoteStepError:
            effects.rollback()
            raise
        except RuntimeError as error:  # a replica's process is gone
            effects.rollback()
            raise self._lose(PeerLost(f"{who} is gone ({error})")) from error

    def _replicas_failed(self) -> None:
        """This pipeline's step failed: tell the other replicas, so none waits for this one."""
        if self._replicas is not None and self._broken is None:
            self._replicas.fail()

    def _agree_on_batch(self, inputs: Any, local_error: BaseException | None
                        ) -> tuple[SplitBatch, list[Any], BaseException | None]:
        """Every rank learns the batch size and shape from stage 0's rank, which also splits the inputs
        (:func:`~pipesched.distributed.agreement.agree_on_batch`)."""
        first = self.placement[0]
        tensors, structure, rows, checksum, local_error = agree_on_batch(
            inputs, local_error, first=first, rank=self.rank, group=self.group, source=self._global(first),
            lose=self._lose, check=self._input_check)
        split = self._runner.split_rows(tensors, rows, False, structure)
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


__all__ = ["StepFrame"]
