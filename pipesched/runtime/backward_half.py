"""``loss_fn(pipe(x), y).backward()``: the backward half of a forward-only call.

``pipe(x)`` runs only the forward actions and keeps what they hold. Its output
is produced by :class:`BackwardHalf`, an autograd Function whose backward
splits the incoming gradient into micro-batches and runs the plan's backward
actions through the same orchestrator. This only makes sense for fill-drain
plans (every forward before any backward on every rank); for schedules that
interleave, the backward raises and points to ``pipe.step()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipesched.runtime.tasks import StepContext
from pipesched.runtime.mailbox import Mailbox
from pipesched.runtime.microbatch import gather
from pipesched.plan.record import TaskRecord
from pipesched.plan.schedule import Plan

if TYPE_CHECKING:
    from pipesched.pipeline import Pipeline


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
        parts = [ctx.input_grads[m][position] for m in range(len(sizes))]
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
    """State kept between ``pipe(x)`` and ``output.backward()``."""

    def __init__(
        self,
        pipe: Pipeline,
        ctx: StepContext,
        plan: Plan,
        inputs: tuple[Tensor, ...],
        sizes: list[int],
        records: list[TaskRecord],
    ):
        self.pipe = pipe
        self.ctx = ctx
        self.plan = plan
        self.sizes = sizes
        self.records = records
        self.inputs = inputs
        self.input_positions = [i for i, t in enumerate(inputs) if t.requires_grad]
        self.inputs_requiring_grad = [inputs[i] for i in self.input_positions]
        self.outputs = gather([ctx.outputs[m][0] for m in range(len(sizes))])
        self.used = False

    def backward(self, grad_outputs: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
        pipe = self.pipe
        if not is_fill_drain(self.plan):
            raise RuntimeError(
                f"schedule {pipe.schedule.name!r} interleaves forwards and backwards, so the "
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
        self.ctx.grad_outputs = [tuple(column[m] for column in per_output) for m in range(count)]
        self.ctx.mode = "backward"
        self.ctx.mailbox = Mailbox(pipe.num_stages, count)
        plan = [[a for a in row if a.kind == "B"] for row in self.plan]
        records = pipe._run(plan, self.ctx, gradients=True, statistics=False)
        pipe._report(self.ctx, sorted(self.records + records, key=lambda r: (r.start, r.rank)), count)
        grads = input_gradients(self.ctx, self.inputs, self.input_positions, self.sizes)
        return tuple(grads)


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

