"""What the workers of one step share: where things run, what goes in, what comes out.

:class:`StepContext` is built once per call by the step runner
(:meth:`pipesched.runtime.runner.StepRunner.context`) and read by every task
body in :mod:`pipesched.runtime.tasks`: the pipeline's fixed layout (stages,
placement, devices, transport), the step's mailbox and checkpoint manager,
what the call feeds its tasks and what the tasks leave for the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pipesched.runtime.caller_state import CallerState
from pipesched.runtime.checkpoint import CheckpointManager
from pipesched.runtime.mailbox import Mailbox
from pipesched.runtime.skip.portal import StepSkips
from pipesched.runtime.structure import Structure
from pipesched.runtime.transport import Transport

#: A value crossing a stage boundary: its tensors, and the structure that rebuilds it.
Boundary = tuple[tuple[Tensor, ...], Structure]


@dataclass(frozen=True)
class PipelineLayout:
    """Where things run, fixed for a pipeline's life: stages, the rank of each, devices, transport.

    ``stages[s]`` is ``None`` for a stage another process runs.
    """

    stages: Sequence[nn.Module | None]
    placement: Sequence[int]
    devices: Sequence[torch.device]  # one per rank
    transport: Transport

    @property
    def num_stages(self) -> int:
        return len(self.stages)


@dataclass(frozen=True)
class StepLabels:
    """What the step's timeline events carry: the schedule's name, whether to log, the clock shift."""

    schedule: str = ""
    log_tasks: bool = True  # emit one structlog "task" event per task (when structlog is configured)
    clock_offset: float = 0.0  # this process's clock minus rank 0's (multi-process timelines)


@dataclass
class StepInputs:
    """What a call feeds its tasks.

    ``step()``: micro-batches, targets, the loss and its weights (the last
    stage computes the loss). ``pipe(x)``: micro-batches only (the last stage
    hands out its output). The backward half of ``pipe(x)``: the gradients of
    the gathered output, split per micro-batch (the last stage's backward
    starts from them).
    """

    microbatches: list[Boundary] = field(default_factory=list)
    targets: list[Any] = field(default_factory=list)
    loss_fn: Callable[..., Tensor] | None = None
    loss_weights: list[float] = field(default_factory=list)
    grad_outputs: list[tuple[Tensor | None, ...]] = field(default_factory=list)
    #: what each loss's backward starts from in place of 1: a GradScaler's scale (see
    #: :mod:`pipesched.runtime.grad_scaling`), on the last stage's device; ``None``: 1
    loss_seed: Tensor | None = None
    #: the batch's loss normaliser (what its mean divides by; ``None``: a summed loss)
    normaliser: float | None = None
    #: ids of the tensors the loss's gradient may land in besides the stage's inputs and parameters,
    #: and why (see :mod:`pipesched.runtime.loss_leaves`); ``None``: any leaf, as ``loss.backward()``
    loss_leaves: tuple[frozenset[int], str] | None = None

    @property
    def computes_loss(self) -> bool:
        return self.loss_fn is not None


@dataclass
class StepResults:
    """What tasks leave for the caller, one entry per micro-batch (each written by one worker)."""

    losses: dict[int, Tensor] = field(default_factory=dict)
    outputs: dict[int, Boundary] = field(default_factory=dict)
    input_grads: dict[int, tuple[Tensor | None, ...]] = field(default_factory=dict)
    input_structure: dict[tuple[int, int], Structure] = field(default_factory=dict)


@dataclass
class StepContext:
    """Everything the workers of one step share."""

    layout: PipelineLayout
    mailbox: Mailbox
    checkpoint: CheckpointManager
    keep: bool  # hold activations for a backward (grad enabled)
    training: list[bool]  # per stage, read once per step
    caller: CallerState = field(default_factory=CallerState)
    labels: StepLabels = field(default_factory=StepLabels)
    io: StepInputs = field(default_factory=StepInputs)
    results: StepResults = field(default_factory=StepResults)
    skips: StepSkips | None = None  # the model's skip connections; None: it has no skippable layer
    replicas: Any = None  # tied weights' per-device replicas for this call (pipesched.runtime.tied)

    @property
    def num_stages(self) -> int:
        return self.layout.num_stages
