"""``loss_fn(pipe(x), y).backward()``: the backward half of a forward-only call.

``pipe(x)`` runs only the forward actions and keeps what they hold. Its output
is produced by :class:`BackwardHalf`, an autograd Function whose backward
splits the incoming gradient into micro-batches and runs the plan's backward
actions through the same orchestrator. This only makes sense for fill-drain
plans (every forward before any backward on every rank); for schedules that
interleave, the backward raises and points to ``pipe.step()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pipesched.observe.report import StepReport
from pipesched.plan.action import Plan
from pipesched.plan.record import TaskRecord
from pipesched.runtime.data_parallel import DataParallelReplicas, combine_replicas
from pipesched.runtime.mailbox import Mailbox
from pipesched.runtime.microbatch import gather
from pipesched.runtime.tasks import StepContext, StepInputs

if TYPE_CHECKING:  # the runner imports nothing of this module: no cycle
    from pipesched.runtime.runner import SplitBatch, StepRunner


def is_fill_drain(plan: Plan) -> bool:
    """True when every rank runs all its forwards before any backward."""
    return all(
        all(a.kind == "F" for a in row[: len(row) // 2]) and all(a.kind == "B" for a in row[len(row) // 2 :])
        for row in plan
    )


def input_gradients(
    ctx: StepContext, tensors: Sequence[Tensor], positions: Sequence[int], sizes: list[int]
) -> list[Tensor | None]:
    """Whole-batch gradients of the inputs at ``positions``, from stage 0's per-micro-batch ones.

    ``None`` for an input no micro-batch used; zeros for micro-batches that did not use it.
    """
    grads: list[Tensor | None] = []
    for position in positions:
        tensor = tensors[position]
        parts = [ctx.results.input_grads[m][position] for m in range(len(sizes))]
        if all(p is None for p in parts):
            grads.append(None)
            continue
        grads.append(
            torch.cat([
                torch.zeros_like(mb) if p is None else p.to(tensor.device)
                for p, mb in zip(parts, torch.split(tensor, sizes))
            ])
        )
    return grads


def backward_into_inputs(tensors: tuple[Tensor, ...], ctx: StepContext, sizes: list[int]) -> None:
    """Continue the backward past stage 0 into inputs that require grad (once, whole batch)."""
    positions = [i for i, t in enumerate(tensors) if t.requires_grad]
    pairs = [
        (tensors[i], g) for i, g in zip(positions, input_gradients(ctx, tensors, positions, sizes))
        if g is not None
    ]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


class BackwardSession:
    """State kept between ``pipe(x)`` and ``output.backward()``.

    ``runner`` runs the backward plan; ``on_report`` receives the report of
    the whole forward-and-backward (the pipeline keeps it as ``last_report``).
    ``replicas`` (with ``data_parallel_group``): the backward combines the
    gradients with the other replicas' before they are committed, by the
    same :func:`~pipesched.runtime.data_parallel.combine_replicas` as
    ``step()``, or every replica would keep only its own and drift apart
    after the optimizer step. The caller's loss is not known here, only its
    gradient, so each replica is weighted by its share of the rows: equal
    parts average (as ``DistributedDataParallel`` does), and for a loss that
    is a mean over rows the result is the global batch's gradient. Then
    every replica takes the first one's buffers of ``module``, as after ``step()``.
    """

    def __init__(
        self,
        runner: StepRunner,
        ctx: StepContext,
        num_microbatches: int,
        split: SplitBatch,
        records: list[TaskRecord],
        parameters: Sequence[Tensor],
        on_report: Callable[[StepReport], None],
        replicas: DataParallelReplicas | None = None,
        module: nn.Module | None = None,
    ):
        self.runner = runner
        self.replicas = replicas
        self.module = module
        self.ctx = ctx
        self.plan, self.lowering = runner.plan(num_microbatches, "B")
        self.full_plan, _ = runner.plan(num_microbatches)
        self.sizes = split.sizes
        self.records = records
        self.parameters = parameters
        self.on_report = on_report
        self.inputs = split.tensors
        self.input_positions = [i for i, t in enumerate(self.inputs) if t.requires_grad]
        self.inputs_requiring_grad = [self.inputs[i] for i in self.input_positions]
        self.outputs = gather([ctx.results.outputs[m][0] for m in range(len(self.sizes))])
        self.used = False

    def backward(self, grad_outputs: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
        if not is_fill_drain(self.full_plan):
            raise RuntimeError(
                f"schedule {self.runner.schedule.name!r} interleaves forwards and backwards, so the "
                f"backward cannot start from pipe(inputs)'s output; use "
                f"pipe.step(inputs, targets) with loss_fn=... instead"
            )
        if self.used:
            raise RuntimeError("the pipeline output's backward can only run once per forward")
        self.used = True
        count = len(self.sizes)
        per_output = [
            [None] * count if g is None else list(torch.split(g, self.sizes)) for g in grad_outputs
        ]
        ctx = self.ctx
        ctx.io = StepInputs(grad_outputs=[tuple(column[m] for column in per_output) for m in range(count)])
        ctx.mailbox = Mailbox(self.lowering)
        records = self._run(ctx)
        everything = sorted(self.records + records, key=lambda r: (r.start, r.rank))
        self.on_report(self.runner.report(count, everything, ctx.checkpoint.memory))
        return tuple(input_gradients(ctx, self.inputs, self.input_positions, self.sizes))

    def _run(self, ctx: StepContext) -> list[TaskRecord]:
        """The backward plan, combined with the other data-parallel replicas' when there are some."""
        replicas = self.replicas
        if replicas is None:
            return self.runner.run(self.plan, ctx, self.parameters, statistics=False)
        joined = False

        def combine() -> None:
            nonlocal joined
            joined = True
            combine_replicas(replicas, ctx, float(sum(self.sizes)), 0.0, list(self.parameters))

        try:
            records = self.runner.run(self.plan, ctx, self.parameters, statistics=False, before_commit=combine)
        except BaseException:
            if not joined:
                replicas.fail()  # the other replicas wait for this one's word
            raise
        if self.module is not None:
            replicas.broadcast(self.module)  # buffers (batch-norm statistics): the first replica's
        return records


class BackwardHalf(torch.autograd.Function):
    """Hooks ``pipe(x)``'s gathered output to the pipeline's backward half."""

    @staticmethod
    def forward(ctx: Any, session: BackwardSession, anchor: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.session = session
        return session.outputs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        session: BackwardSession | None = ctx.session
        if session is None:  # a second backward through the same output (retain_graph, or two losses)
            raise RuntimeError(
                "the pipeline output's backward can only run once per forward (its activations are "
                "freed by the first); run pipe(inputs) again, or sum the losses and call backward once"
            )
        ctx.session = None  # free the held activations once done
        return (None, None, *session.backward(grad_outputs))

