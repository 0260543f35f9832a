"""Run one rank's actions for one step: the F and B task bodies.

Everything here runs on a rank's worker thread. A rank walks its action list
in plan order; each action waits for its inputs in the step's
:class:`~pipesched.mailbox.Mailbox`, computes, and posts its outputs for the
next rank. The event loop is not involved between two actions.

Autograd is cut at every stage boundary: a stage's input is a fresh leaf
(``detach().requires_grad_()``) and its backward is an explicit
``torch.autograd.backward(outputs, grad_outputs)``, whose input gradients are
the next upstream stage's ``grad_outputs``. That is what lets schedules
interleave forwards and backwards of different micro-batches freely.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pipesched.action import Action
from pipesched.batchnorm import frozen_running_stats
from pipesched.caller_state import CallerState
from pipesched.checkpoint import CheckpointManager, is_recomputing
from pipesched.mailbox import Mailbox
from pipesched.report import TaskRecord
from pipesched.structure import Structure, flatten, unflatten
from pipesched.transport import Transport

#: A value crossing a stage boundary: its tensors, and the structure that rebuilds it.
Boundary = tuple[tuple[Tensor, ...], Structure]


@dataclass
class StepContext:
    """Everything the workers of one step share. Written per micro-batch slot, never racing."""

    mode: str  # "train" (step), "forward" (pipe(x)), "backward" (backward half of pipe(x))
    stages: Sequence[nn.Module]
    placement: Sequence[int]
    devices: Sequence[torch.device]
    transport: Transport
    mailbox: Mailbox
    checkpoint: CheckpointManager
    keep: bool  # hold activations for a backward (grad enabled)
    caller: CallerState = field(default_factory=CallerState)
    schedule: str = ""  # the schedule's name, for the timeline events
    clock_offset: float = 0.0  # this process's clock minus rank 0's (multi-process timelines)
    training: list[bool] = field(default_factory=list)  # per stage, read once per step
    inputs: list[Boundary] = field(default_factory=list)
    targets: list[Any] = field(default_factory=list)
    loss_fn: Callable[..., Tensor] | None = None
    loss_weights: list[float] = field(default_factory=list)
    grad_outputs: list[tuple[Tensor | None, ...]] = field(default_factory=list)
    # results
    losses: dict[int, Tensor] = field(default_factory=dict)
    outputs: dict[int, Boundary] = field(default_factory=dict)
    input_grads: dict[int, tuple[Tensor | None, ...]] = field(default_factory=dict)
    input_structure: dict[tuple[int, int], Structure] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.training:
            self.training = [stage is not None and _training(stage) for stage in self.stages]

    @property
    def num_stages(self) -> int:
        return len(self.stages)


def run_rank(ctx: StepContext, rank: int, actions: Sequence[Action], records: list[TaskRecord]) -> None:
    """Run ``actions`` in order on the calling (worker) thread, appending a record per task."""
    clock = time.perf_counter
    for action in actions:
        task = _forward if action.kind == "F" else _backward
        start, end = task(ctx, rank, action.stage, action.microbatch, clock)
        records.append(TaskRecord(rank, action.stage, action.microbatch, action.kind, start, end))


def _as_boundary(value: object, stage: int) -> Boundary:
    return flatten(value, f"stage {stage}")


def _unwrap(tensors: tuple[Any, ...], structure: Structure) -> Any:
    return unflatten(tensors, structure)


def _leaf(tensor: Tensor, wants_grad: bool) -> Tensor:
    leaf = tensor.detach()
    if wants_grad and (leaf.is_floating_point() or leaf.is_complex()):
        leaf.requires_grad_(True)
    return leaf


def _stage_function(ctx: StepContext, stage: int, microbatch: int, structure: Structure) -> Callable[[tuple[Tensor, ...]], Any]:
    """The forward of (stage, micro-batch) as a function of its input leaves.

    On the last stage of a training step it also computes the weighted loss,
    so a recompute rebuilds the loss's graph too. A recompute leaves the
    running statistics of the stage's norms alone: the first run applied them.
    """
    module = ctx.stages[stage]
    last = stage == ctx.num_stages - 1
    call_scope = ctx.caller.call_scope

    def run(inputs: tuple[Tensor, ...]) -> tuple[Boundary, Tensor | None]:
        with call_scope(), frozen_running_stats(module if is_recomputing() else None):
            out = _as_boundary(module(_unwrap(inputs, structure)), stage)
            if not (last and ctx.mode == "train"):
                return out, None
            loss = ctx.loss_fn(_unwrap(*out), _to_device(ctx.targets[microbatch], out[0][0].device))  # type: ignore[misc]
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got "
                f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}; "
                f"use a mean- or sum-reduced loss"
            )
        return out, loss.reshape(()) * ctx.loss_weights[microbatch]

    return run


def _training(stage: nn.Module) -> bool:
    """Whether any layer of the stage is in training mode.

    The stage wrapper itself is not a submodule of the user's model, so
    ``model.eval()`` reaches its layers but not its own ``training`` flag.
    """
    return any(layer.training for layer in stage.children())


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    return tuple(v.to(device, non_blocking=True) for v in value)


def _forward(
    ctx: StepContext, rank: int, stage: int, microbatch: int, clock: Callable[[], float]
) -> tuple[float, float]:
    """Run F(stage, micro-batch); return its start and end times.

    The end is taken *before* the output is posted: once posted, the consumer
    may start, and a task must not appear to end after its successor began.
    """
    device = ctx.devices[rank]
    if stage == 0:
        tensors, structure = ctx.inputs[microbatch]
        start = clock()
        tensors = tuple(t.to(device, non_blocking=True) for t in tensors)
        leaves = tuple(_leaf(t, ctx.keep and t.requires_grad) for t in tensors)
    else:
        packet, structure = ctx.mailbox.activations[(stage - 1, microbatch)].get()
        start = clock()
        leaves = tuple(_leaf(t, ctx.keep) for t in ctx.transport.receive(packet, rank))
    ctx.input_structure[(stage, microbatch)] = structure
    run = _stage_function(ctx, stage, microbatch, structure)
    (outputs, out_structure), loss = ctx.checkpoint.forward(
        stage, microbatch, rank, device, ctx.training[stage], leaves, lambda: run(leaves), ctx.keep
    )
    if stage == ctx.num_stages - 1:
        if loss is not None:
            ctx.losses[microbatch] = loss.detach()
        else:
            ctx.outputs[microbatch] = (tuple(o.detach() for o in outputs), out_structure)
        return start, clock()
    packet = ctx.transport.send(outputs, rank, ctx.placement[stage + 1])
    end = clock()
    ctx.mailbox.activations[(stage, microbatch)].put((packet, out_structure))
    return start, end


def _backward(
    ctx: StepContext, rank: int, stage: int, microbatch: int, clock: Callable[[], float]
) -> tuple[float, float]:
    """Run B(stage, micro-batch); return its start and end times (end before posting)."""
    last = stage == ctx.num_stages - 1
    if last:
        start = clock()
        grads: tuple[Tensor | None, ...] = ()
        if ctx.mode != "train":
            grads = tuple(
                None if g is None else g.to(ctx.devices[rank], non_blocking=True)
                for g in ctx.grad_outputs[microbatch]
            )
    else:
        packet = ctx.mailbox.gradients[(stage + 1, microbatch)].get()
        start = clock()
        grads = ctx.transport.receive(packet, rank)
    run = _stage_function(ctx, stage, microbatch, ctx.input_structure[(stage, microbatch)])
    inputs, ((outputs, _), loss) = ctx.checkpoint.for_backward(stage, microbatch, rank, run)
    if last and ctx.mode == "train":
        roots, root_grads = ([loss], [None]) if loss is not None and loss.requires_grad else ([], [])
    else:
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        roots, root_grads = [o for o, _ in pairs], [g for _, g in pairs]
    if roots:
        torch.autograd.backward(roots, root_grads)
    input_grads = tuple(x.grad if x.requires_grad else None for x in inputs)
    ctx.checkpoint.release(stage, microbatch, rank)
    if stage == 0:
        ctx.input_grads[microbatch] = input_grads
        return start, clock()
    packet = ctx.transport.send(input_grads, rank, ctx.placement[stage - 1])
    end = clock()
    ctx.mailbox.gradients[(stage, microbatch)].put(packet)
    return start, end
