"""The part of a step both pipelines share: one runner for the ranks this process runs.

``Pipeline`` (every rank in one process) and ``DistributedPipeline`` (one rank
per process) differ in how a step *begins and ends*: one process splits and
gathers the batch itself, many processes first agree on the batch size and
afterwards exchange their outcomes. Everything in between is the same and
lives here, so the two cannot drift apart:

* the user's options, checked once (:class:`StepOptions`);
* the validated plan and its lowering for each micro-batch count;
* splitting inputs into micro-batches and targets into theirs, with the loss
  weights of each (:mod:`pipesched.runtime.loss_normalizer`);
* the step context: layout, mailbox, checkpoint manager with this step's
  random streams, caller state, labels;
* running a plan on the orchestrator, with ``.grad`` and deferred batch-norm
  statistics held back until the step succeeds (:class:`StepEffects`);
* the step report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipesched.observe.report import StepReport
from pipesched.plan.action import Plan
from pipesched.plan.lowering import Lowering
from pipesched.plan.costs import median_costs
from pipesched.plan.record import TaskRecord
from pipesched.plan.schedule import PlanCache, Schedule
from pipesched.runtime.batchnorm import DeferredBatchNorm
from pipesched.runtime.caller_state import CallerState
from pipesched.runtime.checkpoint import (
    CheckpointManager,
    CheckpointPolicy,
    LazyPointers,
    MeterCache,
    RankMemory,
    check_meter_mode,
    make_policy,
)
from pipesched.runtime.cpu_threads import warn_if_oversubscribed
from pipesched.runtime.loss_normalizer import (
    LossNormalizer,
    PaddedTargetsCheck,
    check_loss_normalizer,
    loss_counts,
    weights_of,
)
from pipesched.runtime.mailbox import Mailbox
from pipesched.runtime.microbatch import as_tensors, batch_size, batch_tensors, scatter, split_sizes
from pipesched.runtime.options import check_chunks, check_flag, check_loss_fn, check_stall_timeout, resolve_schedule
from pipesched.runtime.orchestrator import Orchestrator
from pipesched.runtime.rng import RandomStreams
from pipesched.runtime.skip.layout import SkipLayout
from pipesched.runtime.skip.portal import StepSkips
from pipesched.runtime.step_effects import StepEffects
from pipesched.runtime.tied import TiedWeights
from pipesched.runtime.structure import TENSOR, TUPLE, Structure
from pipesched.runtime.tasks import (
    Boundary,
    PipelineLayout,
    StepContext,
    StepInputs,
    StepLabels,
    training_flags,
)
from pipesched.runtime.transport import Transport


@dataclass(frozen=True)
class StepOptions:
    """The user's step options, checked once; each bad value names the argument and the fix."""

    schedule: Schedule
    chunks: int
    checkpoint: CheckpointPolicy
    loss_fn: Any
    loss_normalizer: LossNormalizer | None
    deferred_batch_norm: bool
    stall_timeout: float | None
    log_tasks: bool
    activation_meter: str

    @classmethod
    def check(
        cls, *, schedule: Any, chunks: Any, checkpoint: Any, loss_fn: Any, loss_normalizer: Any,
        deferred_batch_norm: Any, stall_timeout: Any, log_tasks: Any, activation_meter: Any,
    ) -> StepOptions:
        check_loss_fn(loss_fn)
        make_policy(checkpoint)  # refuses an unknown policy now
        return cls(
            schedule=resolve_schedule(schedule),
            chunks=check_chunks(chunks),
            checkpoint=checkpoint,
            loss_fn=loss_fn,
            loss_normalizer=check_loss_normalizer(loss_normalizer, loss_fn),
            deferred_batch_norm=check_flag("deferred_batch_norm", deferred_batch_norm),
            stall_timeout=check_stall_timeout(stall_timeout),
            log_tasks=check_flag("log_tasks", log_tasks),
            activation_meter=check_meter_mode(activation_meter),
        )


@dataclass(frozen=True)
class SplitBatch:
    """A batch cut into micro-batches: the tensors, the rows of each part, the parts."""

    tensors: tuple[Tensor, ...]
    sizes: list[int]
    microbatches: list[Boundary]


class StepRunner:
    """Plans, contexts, runs and reports steps for the ranks ``ranks`` of a pipeline.

    ``stages[s]`` is ``None`` for a stage another process runs; ``devices[r]``
    is rank r's device (a multi-process pipeline gives every rank its own
    device, since each process sees only its own). ``skips``: the stages'
    skip connections (:func:`~pipesched.runtime.skip.layout.inspect_skip_layout`).
    """

    def __init__(
        self,
        options: StepOptions,
        stages: Sequence[nn.Module | None],
        placement: Sequence[int],
        devices: Sequence[torch.device],
        ranks: Sequence[int] | None = None,
        skips: SkipLayout | None = None,
    ):
        self.options = options
        self.skips = skips if skips is not None else SkipLayout()
        self.schedule = options.schedule
        self.stages = list(stages)
        self.placement = list(placement)
        self.devices = list(devices)
        self.num_stages = len(self.stages)
        self.num_ranks = len(self.devices)
        self.ranks = list(range(self.num_ranks)) if ranks is None else list(ranks)
        self.log_tasks = options.log_tasks
        self._policy = make_policy(options.checkpoint)
        self._padded_targets = PaddedTargetsCheck(options.loss_fn, options.loss_normalizer)
        self._meter = MeterCache() if options.activation_meter == "once" else None
        self._plans = PlanCache(self.schedule, self.num_stages, self.num_ranks, self.placement, split_backward=True,
                                skips=self.skips.edges)
        self._parts: dict[tuple[int, str], tuple[Plan, Lowering]] = {}
        self.plan(options.chunks)  # refuse a shape the schedule cannot run before building anything
        self.random = RandomStreams()
        warn_if_oversubscribed([self.devices[r] for r in self.ranks])
        self.orchestrator = Orchestrator([self.devices[r] for r in self.ranks], options.stall_timeout, self.ranks)
        local = dict(zip(self.ranks, self.orchestrator.compute_streams))
        streams = [local.get(r, local[self.ranks[0]]) for r in range(self.num_ranks)]
        self.layout = PipelineLayout(self.stages, self.placement, self.devices, Transport(self.devices, streams))
        self.ties = TiedWeights.find(self.stages, self.placement, self.devices)  # replicas per device

    def batch_norms(self) -> list[DeferredBatchNorm]:
        """The deferred batch norms of this process's stages (looked up per step: converting
        happens in place, possibly after the runner was built)."""
        return [m for stage in self.stages if stage is not None for m in stage.modules()
                if isinstance(m, DeferredBatchNorm)]

    # ---------------------------------------------------------------- plans

    def plan(self, num_microbatches: int, kinds: str = "") -> tuple[Plan, Lowering]:
        """The validated plan for ``num_microbatches`` and its lowering (computed once each).

        ``kinds`` keeps only those action kinds, in plan order (``"F"``: the
        forward half of ``pipe(x)``); its lowering then lists only their
        transfers, so no rank waits for a message the half never sends.
        """
        key = (num_microbatches, kinds)
        part = self._parts.get(key)
        if part is None:
            plan = self._plans(num_microbatches)
            if kinds:
                plan = [[a for a in row if a.kind in kinds] for row in plan]
            part = self._parts[key] = (plan, Lowering(plan, self.num_stages, self.skips.edges))
        return part

    # ------------------------------------------------------------- batches

    def split_inputs(self, inputs: Any) -> SplitBatch:
        """``inputs`` (a Tensor, a tuple of them, or a mapping of keyword names to batch-first
        Tensors) as ``chunks`` near-equal micro-batches; a mapping stays a mapping per micro-batch."""
        tensors, structure = batch_tensors(inputs)
        return self.split_rows(tensors, batch_size(tensors, "inputs"), False, structure)

    def split_rows(self, tensors: tuple[Tensor, ...], rows: int, single: bool,
                   structure: Structure | None = None) -> SplitBatch:
        sizes = split_sizes(rows, self.options.chunks)
        structure = structure or (TENSOR if single else TUPLE)
        return SplitBatch(tensors, sizes, [(mb, structure) for mb in scatter(tensors, sizes)])

    def split_targets(self, targets: Any, sizes: list[int]) -> tuple[list[Any], list[float], float | None]:
        """``targets`` cut like the inputs, each micro-batch's loss weight, and the batch's normaliser
        (the count its mean divides by; ``None`` for a summed loss)."""
        target_tensors = as_tensors(targets, "targets")
        rows = batch_size(target_tensors, "targets")
        if rows != sum(sizes):
            raise ValueError(
                f"targets hold {rows} rows but inputs hold {sum(sizes)}; they must match row for row"
            )
        self._padded_targets(target_tensors)
        single = isinstance(targets, Tensor)
        parts = [mb[0] if single else mb for mb in scatter(target_tensors, sizes)]
        counts = loss_counts(self.options.loss_fn, parts, self.options.loss_normalizer)
        return parts, weights_of(counts, len(parts)), None if counts is None else sum(counts)

    # ------------------------------------------------------------- context

    def context(self, lowering: Lowering, *, keep: bool, io: StepInputs | None = None,
                clock_offset: float = 0.0) -> StepContext:
        """A fresh step context: mailbox, checkpoint manager and random streams for this step.

        Reads the caller's thread state (grad mode, autocast, saved-tensor
        hooks) and draws the step's random seed, so call it on the caller's thread.
        Tied weights get fresh replicas from their owners' current values
        (:mod:`pipesched.runtime.tied`): every step or forward starts here.
        """
        caller = CallerState.capture()
        training = training_flags(self.stages)
        random = self.random.step(self.stages, [self.devices[r] for r in self.placement], training)
        replicas = self.ties.refresh() if self.ties else None
        checkpoint = CheckpointManager(
            self._policy, lowering.num_microbatches, random,
            LazyPointers(self.stages, replicas.pointers() if replicas is not None else frozenset()),  # type: ignore[arg-type]
            [RankMemory() for _ in range(self.num_ranks)], caller.saved_tensor_hooks,
            cache=self._meter, context=(tuple(training), caller.autocast, caller.saved_tensor_hooks is None),
        )
        return StepContext(
            layout=self.layout,
            mailbox=Mailbox(lowering),
            checkpoint=checkpoint,
            keep=keep,
            training=training,
            caller=caller,
            labels=StepLabels(self.schedule.name, self.log_tasks, clock_offset),
            io=io or StepInputs(),
            skips=None if self.skips.empty else StepSkips(self.skips, self.layout.transport),
            replicas=replicas,
        )

    # ----------------------------------------------------------------- run

    def effects(self, parameters: Iterable[Tensor], statistics: bool = True) -> StepEffects:
        """Hold ``.grad`` of ``parameters`` (and, with ``statistics``, batch-norm updates) until commit."""
        return StepEffects(parameters, self.batch_norms() if statistics else ())

    def run(self, plan: Plan, ctx: StepContext, parameters: Iterable[Tensor], *, statistics: bool,
            before_commit: Callable[[], None] | None = None) -> list[TaskRecord]:
        """Run ``plan``; on any failure leave ``.grad`` and batch-norm statistics as they were.

        ``parameters``: those the plan accumulates gradients into (none for a
        forward-only call). ``statistics``: the plan runs every forward of the
        batch, so deferred batch norms apply their update once it succeeds.
        ``before_commit``: called once the step succeeded, while ``.grad``
        holds only this step's gradients (data parallelism combines them
        there); if it raises, the step is rolled back like any failure.
        """
        effects = self.effects(parameters)
        replicas = ctx.replicas
        try:
            if replicas is None:
                records = self.orchestrator.run(plan, ctx)
            else:
                with replicas.installed():
                    records = self.orchestrator.run(plan, ctx)
        except BaseException:
            if replicas is not None:
                replicas.discard()
            effects.rollback()
            raise
        if replicas is not None:
            replicas.reduce()  # before commit: the owners' .grad holds only this step's part yet
        if before_commit is not None:
            try:
                before_commit()
            except BaseException:
                effects.rollback()
                raise
        effects.commit(statistics)
        self.log_memory(ctx.checkpoint.memory)
        return records

    def log_memory(self, memory: Sequence[RankMemory]) -> None:
        """One ``"memory"`` event per rank of this process, tagged like the step's task events just logged.

        It carries the report's peak activation bytes and in-flight count
        (``memory[r]`` for rank r), so a timeline read back from the log shows
        what ``pipe.last_report`` showed.
        """
        if self.log_tasks:
            step = self.orchestrator.steps - 1
            self.orchestrator.events.emit("memory", (
                {"step": step, "schedule": self.schedule.name, "rank": rank,
                 "peak_activation_bytes": memory[rank].peak_bytes, "peak_inflight": memory[rank].peak_inflight}
                for rank in self.ranks
            ))

    def learn(self, records: Sequence[TaskRecord]) -> None:
        """Hand a schedule that wants measured costs this step's median task times (the generic
        ``wants_costs`` hook); when it says its plans are stale, plan every micro-batch count again."""
        if self.schedule.wants_costs and records:
            self.learn_costs(median_costs(records))

    def learn_costs(self, costs: Mapping[tuple[str, int], float]) -> None:
        """Hand the schedule a table of ``{(kind, stage): seconds}`` (every stage's, merged across
        processes by a :class:`~pipesched.distributed.DistributedPipeline`); re-plan if it asks."""
        if self.schedule.use_costs(costs):
            self._plans = PlanCache(self.schedule, self.num_stages, self.num_ranks, self.placement, split_backward=True)
            self._parts.clear()

    def report(self, num_microbatches: int, records: list[TaskRecord], memory: Sequence[RankMemory]) -> StepReport:
        return StepReport(
            schedule=self.schedule.name,
            plan=self.schedule.describe_plan(num_microbatches),
            num_stages=self.num_stages,
            num_ranks=self.num_ranks,
            num_microbatches=num_microbatches,
            placement=list(self.placement),
            tasks=records,
            peak_inflight=[m.peak_inflight for m in memory],
            peak_activation_bytes=[m.peak_bytes for m in memory],
            held_activation_bytes=[m.held_bytes for m in memory],
        )

    def close(self) -> None:
        self.orchestrator.close()
