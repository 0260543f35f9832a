"""``Pipeline``: what training code touches. Validates, splits, and owns the rest.

::

    pipe = Pipeline(model, schedule="1f1b", balance=[4, 4], devices=["cuda:0", "cuda:1"],
                    chunks=8, loss_fn=nn.CrossEntropyLoss())
    loss = pipe.step(inputs, targets)   # forward + backward, gradients accumulated in .grad
    optimizer.step()

Gradients equal those of ``loss_fn(model(inputs), targets).backward()`` on the
un-pipelined model: each micro-batch's loss is weighted by its share of the
batch's normaliser (rows; valid tokens for ``CrossEntropyLoss``/``NLLLoss``
with ``ignore_index`` or class weights; see :mod:`pipesched.runtime.loss_normalizer`),
or by 1 (``reduction == "sum"``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipesched.observe.report import StepReport
from pipesched.plan.schedule import Schedule, validate_placement
from pipesched.runtime.backward_half import BackwardHalf, BackwardSession, backward_into_inputs
from pipesched.runtime.any_model import ModelCut, check_cut_arguments, resolve_cut
from pipesched.runtime.batchnorm import convert_deferred_batch_norm
from pipesched.runtime.checkpoint import CheckpointPolicy
from pipesched.runtime.compiling import compile_callback, compile_refused, compile_stages
from pipesched.runtime.data_parallel import (
    DataParallelReplicas,
    check_data_parallel_group,
    combine_replicas,
)
from pipesched.runtime.grad_scaling import backward_seed
from pipesched.runtime.host_buffer import refuse_sparse_gradients
from pipesched.runtime.loss_leaves import REPLICAS_DRIFT
from pipesched.runtime.loss_normalizer import LossNormalizer, batch_loss
from pipesched.runtime.microbatch import gather
from pipesched.runtime.options import grad_disabled, missing_loss_fn
from pipesched.runtime.partition import (
    check_shared_parameters,
    resolve_layout,
    split_module,
)
from pipesched.runtime.pipeline_module import PipelineModule
from pipesched.runtime.runner import StepOptions, StepRunner
from pipesched.runtime.skip.layout import inspect_skip_layout
from pipesched.runtime.skip.skippable import verify_skippables
from pipesched.runtime.state_dict import route_to_layers
from pipesched.runtime.tasks import StepInputs
from pipesched.runtime.structure import unflatten

LossFn = Callable[[Any, Any], Tensor]


class Pipeline(PipelineModule):
    """Run a model as a pipeline of stages on ranks under a pluggable schedule.

    Args:
        module: the model. An ``nn.Sequential``'s layers are cut into stages by
            ``balance``. Any other ``nn.Module`` (a Hugging Face LLM) is traced
            with ``torch.export`` and cut at ``split_points``, keeping its own
            forward logic and its own parameters (:mod:`pipesched.runtime.any_model`);
            its inputs are then a dict of keyword tensors.
            In an ``nn.Sequential`` a layer object listed twice is two layers. A parameter shared by
            stages (a tied embedding and head) is exact: stages on one device
            share it, stages on other devices use a replica refreshed from it
            at the start of every step or forward, whose gradients are summed
            into it (:mod:`pipesched.runtime.tied`). Shared buffers, and one
            layer object on two devices, are refused naming the fix.
        split_points: for a model that is not an ``nn.Sequential``: fully qualified
            module names, each the first module of a new stage
            (``["model.layers.2"]``). ``None``: cuts in its block list (longest
            ``nn.ModuleList`` of one class), by parameter count or by ``balance``
            counted in blocks.
        forward_kwargs: non-tensor keyword arguments of the model's forward, given once.
        example_inputs: a dict of a few rows of the keyword tensors, to trace and
            probe with. Default for a Hugging Face LM: ``input_ids`` and ``attention_mask``.
        schedule: a registered name (``"gpipe"``, ``"1f1b"``,
            ``"interleaved-1f1b"``/``"interleaved"``, or one you registered) or
            a :class:`~pipesched.Schedule` instance.
        balance: layers per stage; sums to ``len(module)`` (a traced model: blocks
            of its block list per stage). Default: the
            schedule's stage count for the ranks (one per rank; two per rank
            for interleaved), layers split as evenly as possible.
        devices: one device per rank (several ranks may share ``"cpu"``;
            ``"cpu:0"`` and ``"cpu:1"`` count as two devices).
            Default: the ranks the balance and schedule need (or, without a
            balance, one per CUDA device) on round-robin CUDA devices, or on
            ``"cpu"`` when CUDA is absent, with two ranks when nothing else
            fixes the count (fewer if the module has too few layers).
        chunks: micro-batches per batch (>= 1). A batch with fewer rows runs
            one row per micro-batch.
        checkpoint: ``"always"``, ``"except_last"`` (every micro-batch but the
            last), ``"never"``, or a callable ``(stage, microbatch) -> bool``.
        loss_fn: ``loss_fn(output, target) -> scalar`` applied per micro-batch
            on the last stage; needed by :meth:`step`. An instance, e.g.
            ``nn.CrossEntropyLoss()``; ``reduction="none"`` is refused.
        loss_normalizer: ``loss_normalizer(targets_of_a_microbatch) -> count``
            (a number or 0-dim tensor): what ``loss_fn``'s mean divides by,
            for one micro-batch. Each micro-batch's loss is weighted by its
            count over the batch's, so the gradients are the whole batch's.
            ``None``: rows for mean losses; for ``CrossEntropyLoss`` and
            ``NLLLoss`` with class-index targets the sum of the class weights
            (1 each by default) of targets other than ``ignore_index``; 1 per
            micro-batch for ``reduction="sum"``. Declare it for a plain
            function: ``lambda y: (y != -100).sum()``. A micro-batch counting
            0 adds nothing; a batch counting 0 returns a NaN loss (torch's
            0/0) and accumulates no gradient.
        deferred_batch_norm: turn the module's batch norms (in place, same
            objects) into :class:`~pipesched.runtime.batchnorm.DeferredBatchNorm`, whose running
            statistics are updated once per step from the whole batch.
        stall_timeout: seconds a step may go without any task finishing before
            it is aborted with :class:`~pipesched.StepStalled`, which says what
            every rank waits on. ``None`` waits forever.
        log_tasks: emit one structlog ``"task"`` event per task when structlog
            is configured (the timeline reads them). ``False`` keeps them out
            of your application's log; :attr:`last_report` is unaffected.
            A failure to log is a warning, never a failed step.
        activation_meter: how :attr:`last_report`'s activation bytes are
            measured. ``"once"`` (default): each forward signature (stage,
            checkpointing, training mode, autocast, input shapes) is measured
            the first time it runs and its bytes reused afterwards, so later
            forwards run without the meter's per-tensor hooks. ``"every"``:
            every forward is measured (costs a Python call per saved tensor).
        data_parallel_group: a ``torch.distributed`` process group of
            processes that each run this pipeline on their own part of the
            global batch (data parallelism across pipelines, e.g. one per
            node). Every ``step()`` then leaves every process the gradients
            and the loss of the global batch; see
            :mod:`pipesched.runtime.data_parallel`. Default: one process.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        split_points: Sequence[str] | None = None,
        forward_kwargs: Mapping[str, Any] | None = None,
        example_inputs: Mapping[str, Tensor] | None = None,
        schedule: str | Schedule = "gpipe",
        balance: Sequence[int] | None = None,
        devices: Sequence[str | int | torch.device] | None = None,
        chunks: int = 1,
        checkpoint: CheckpointPolicy = "except_last",
        loss_fn: LossFn | None = None,
        loss_normalizer: LossNormalizer | None = None,
        deferred_batch_norm: bool = False,
        stall_timeout: float | None = 600.0,
        log_tasks: bool = True,
        activation_meter: str = "once",
        data_parallel_group: Any = None,
    ):
        super().__init__()
        sequential = check_cut_arguments(module, split_points=split_points, forward_kwargs=forward_kwargs,
                                         example_inputs=example_inputs, deferred_batch_norm=deferred_batch_norm)
        if sequential and len(module) == 0:
            raise ValueError("module is an empty nn.Sequential; give it at least one layer")
        if data_parallel_group is not None:
            check_data_parallel_group(data_parallel_group)  # before any thread starts
            refuse_sparse_gradients([m for m in (module, loss_fn) if isinstance(m, nn.Module)], "data_parallel_group")
        verify_skippables(module)  # every skip name stashed once and popped once after, as torchgpipe's GPipe
        options = StepOptions.check(
            schedule=schedule, chunks=chunks, checkpoint=checkpoint, loss_fn=loss_fn,
            loss_normalizer=loss_normalizer, deferred_batch_norm=deferred_batch_norm,
            stall_timeout=stall_timeout, log_tasks=log_tasks, activation_meter=activation_meter,
        )
        schedule = options.schedule
        self.module = module
        self.schedule = schedule
        self.chunks = chunks
        self.checkpoint = checkpoint
        self.loss_fn = loss_fn
        self.loss_normalizer = options.loss_normalizer
        self._cut: ModelCut | None = None
        if sequential:
            self.devices, self.balance = resolve_layout(len(module), schedule, balance, devices)
        else:
            points, self.devices, self.balance = resolve_cut(module, schedule, split_points, balance, devices)
        self.num_ranks = len(self.devices)
        self.num_stages = len(self.balance)
        self.placement = validate_placement(
            schedule.placement(self.num_stages, self.num_ranks), self.num_stages, self.num_ranks
        )
        if sequential:
            self._stages = split_module(module, self.balance)
        else:
            self._cut = ModelCut(module, points, example_inputs, forward_kwargs)
            self._stages = list(self._cut.stages)
        # refuse weights shared across devices, and a shape the schedule cannot run (the
        # runner validates its plan first), before the module is changed in place
        check_shared_parameters(self._stages, self.placement, self.devices)
        self._runner = StepRunner(options, self._stages, self.placement, self.devices,
                                  skips=inspect_skip_layout(self._stages))
        self._finalizer = weakref.finalize(self, self._runner.close)
        if deferred_batch_norm:
            convert_deferred_batch_norm(module)
        for stage, rank in zip(self._stages, self.placement):
            stage.to(self.devices[rank])
        if self._cut is not None:
            self._cut.place([self.devices[rank] for rank in self.placement])
        self._runner.ties.place_owners()  # a tied weight lives on its first stage's device
        self.last_report: StepReport | None = None
        # the model's parameters and loss_fn's (an nn.Module loss): trained, rolled back and combined alike
        layout = ("Pipeline", tuple(self.balance), tuple(self.placement), sum(p.numel() for p in self.parameters()))
        self._replicas = (DataParallelReplicas(data_parallel_group, layout, self)
                          if data_parallel_group is not None else None)

    @property
    def stages(self) -> list[nn.Module]:
        """The stage modules, in stage order: ``nn.Sequential`` objects sharing layers with ``module``,
        or for a traced model :class:`~pipesched.runtime.model_cut.CutStage` objects holding its tensors."""
        return list(self._stages)

    # -------------------------------------------------------------- execution

    @property
    def _random(self) -> Any:
        return self._runner.random

    def step(self, inputs: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor], targets: Tensor | tuple[Tensor, ...], *,
             scaler: Any = None) -> Tensor:
        """Forward and backward of the whole batch under the schedule; returns the detached loss.

        ``inputs``: a Tensor or a tuple of them, or a dict of batch-first
        keyword tensors (a traced model's ``forward(**inputs)``), split along
        dim 0 into micro-batches. Gradients are *accumulated* into ``.grad`` (call ``optimizer.zero_grad()``
        between steps as usual). If a tensor of ``inputs`` requires grad, its
        ``.grad`` receives the input gradient too.

        ``scaler``: a ``torch.amp.GradScaler`` for float16 mixed precision. The
        backward then computes the gradients of ``scaler.scale(loss)``, as
        ``scaler.scale(loss).backward()`` would; follow with
        ``scaler.step(optimizer)`` and ``scaler.update()``. The returned loss
        is unscaled (see :mod:`pipesched.runtime.grad_scaling`).
        """
        if torch.compiler.is_compiling() or compile_callback() not in (None, False):
            raise compile_refused("Pipeline")  # inline on purpose: see pipesched.runtime.compiling
        if self.loss_fn is None:
            raise missing_loss_fn()
        if not torch.is_grad_enabled():
            raise grad_disabled()
        runner = self._runner
        replicas = self._replicas
        joined: list[float] = []  # the global loss, once this step joined the replicas' exchange
        try:
            split = runner.split_inputs(self._checked(inputs))
            targets_mb, weights, normaliser = runner.split_targets(targets, split.sizes)
            count = len(split.sizes)
            plan, lowering = runner.plan(count)
            seed = backward_seed(scaler, self.devices[self.placement[-1]])
            io = StepInputs(split.microbatches, targets_mb, self.loss_fn, weights, loss_seed=seed)
            if replicas is not None:
                io.loss_leaves = (frozenset(map(id, self.parameters())), REPLICAS_DRIFT)
            ctx = runner.context(lowering, keep=True, io=io)

            def combine() -> None:  # data parallelism: this step's gradients with the other replicas'
                joined.append(math.nan)
                local = batch_loss([ctx.results.losses[m] for m in range(count)], weights)
                joined[0] = combine_replicas(replicas, ctx, normaliser, float(local),  # type: ignore[arg-type]
                                             list(self.parameters()))

            records = runner.run(plan, ctx, self.parameters(), statistics=True,
                                 before_commit=None if replicas is None else combine)
        except BaseException:
            if replicas is not None and not joined:
                replicas.fail()  # the other replicas wait for this one's word
            raise
        if replicas is not None:
            replicas.broadcast(self)  # batch-norm statistics (the model's, loss_fn's): the first replica's
        self.last_report = runner.report(count, records, ctx.checkpoint.memory)
        runner.learn(records)
        backward_into_inputs(split.tensors, ctx, split.sizes)
        loss = batch_loss([ctx.results.losses[m] for m in range(count)], weights)
        return loss if replicas is None else torch.full_like(loss, joined[0])

    def forward(self, inputs: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor]) -> Any:
        """Forward half only; the output is gathered on the last rank's device.

        It has the last stage's structure: a Tensor, a tuple of Tensors, or a
        mapping (same keys and type) whose every Tensor is gathered.

        With grad enabled, ``output.backward(...)`` (e.g. through
        ``loss_fn(pipe(x), y).backward()``) runs the backward half through the
        pipeline for fill-drain schedules; schedules that interleave forwards
        and backwards raise ``RuntimeError`` there and point to :meth:`step`.
        With ``data_parallel_group`` that backward combines the replicas'
        gradients as ``step()`` does, weighting each by its share of the rows
        (so equal parts average, as ``DistributedDataParallel``), and then
        broadcasts the first replica's buffers. A forward (with grad) that
        fails on one replica joins that exchange as failed, so the others'
        backward raises :class:`RemoteStepError` rather than wait for it.
        """
        if torch.compiler.is_compiling() or compile_callback() not in (None, False):
            raise compile_refused("Pipeline")  # inline on purpose: see pipesched.runtime.compiling
        runner = self._runner
        keep = torch.is_grad_enabled()
        try:
            split = runner.split_inputs(self._checked(inputs))
            count = len(split.sizes)
            plan, lowering = runner.plan(count, "F")
            ctx = runner.context(lowering, keep=keep, io=StepInputs(split.microbatches))
            records = runner.run(plan, ctx, (), statistics=True)
        except BaseException:
            if keep and self._replicas is not None:
                self._replicas.fail()  # the other replicas' backward halves wait for this one's word
            raise
        self.last_report = runner.report(count, records, ctx.checkpoint.memory)
        parts = [ctx.results.outputs[m][0] for m in range(count)]
        structure = ctx.results.outputs[0][1]
        if not keep:
            return unflatten(gather(parts), structure)
        session = BackwardSession(runner, ctx, count, split, records, list(self.module.parameters()),
                                  self._keep_report, self._replicas, self.module)
        anchor = torch.empty(0, requires_grad=True)
        outputs = BackwardHalf.apply(session, anchor, *session.inputs_requiring_grad)
        return unflatten(tuple(outputs), structure)

    def _checked(self, inputs: Any) -> Any:
        """``inputs``, after a traced model's cut checked them (keys, fixed dims, training mode)."""
        if self._cut is not None:
            self._cut.check_inputs(inputs, self.module.training)
        return inputs

    def _keep_report(self, report: StepReport) -> None:
        self.last_report = report

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` of the model's (and ``loss_fn``'s) gradients, after ``step()``.

        The same as calling torch's function on ``pipe.parameters()``; here so
        that code written for :class:`~pipesched.distributed.DistributedPipeline`,
        where clipping needs the norm of every process's gradients, runs
        unchanged on one process.
        """
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm, norm_type, error_if_nonfinite)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile every stage in place with ``torch.compile(*args, **kwargs)``.

        ``pipe(x)`` and ``pipe.step()`` then run the compiled stages on their
        workers; the pipeline itself stays plain Python (``torch.compile(pipe)``
        is refused, see :mod:`pipesched.runtime.compiling`). ``module`` is not
        touched: calling the model directly stays eager.
        """
        compile_stages(self._stages, [self.devices[rank] for rank in self.placement], *args, **kwargs)

    # ------------------------------------------------------------- state dict

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The model's state dict: exactly the keys and values of ``module.state_dict()``.

        So a checkpoint moves freely between this pipeline, a pipeline of
        another schedule or balance, and the plain model. ``loss_fn`` is not
        part of the model and not saved.
        """
        return self.module.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a state dict of the model (or of any pipeline of it), as ``module.load_state_dict``."""
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Loading through a module that holds this pipeline: model keys to ``module.`` paths.

        ``loss_fn`` keeps its own state (it is not saved, so nothing is loaded into it).
        """
        route_to_layers(state_dict, prefix, {name: "module." for name in self.module._modules})
        if isinstance(self.loss_fn, nn.Module):
            for key, value in self.loss_fn.state_dict(keep_vars=True).items():
                state_dict.setdefault(f"{prefix}loss_fn.{key}", value)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop this pipeline's worker and event-loop threads. Idempotent."""
        self._finalizer()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
