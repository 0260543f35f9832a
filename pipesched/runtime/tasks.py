"""Run one rank's actions for one step: the F, B and W task bodies.

Everything here runs on a rank's worker thread. A rank walks its action list
in plan order; each action waits for its inputs in the step's
:class:`~pipesched.runtime.mailbox.Mailbox`, computes, and posts its outputs for the
next rank. The event loop is not involved between two actions.

Autograd is cut at every stage boundary: a stage's input is a fresh leaf
(:mod:`~pipesched.runtime.stage_input`; the stage computes on a non-leaf
alias of it) and its backward is an explicit
``torch.autograd.backward(outputs, grad_outputs)``, whose input gradients are
the next upstream stage's ``grad_outputs``. That is what lets schedules
interleave forwards and backwards of different micro-batches freely.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.profiler as _profiler
from torch import Tensor, nn

from pipesched.plan.action import Action
from pipesched.runtime.batchnorm import frozen_running_stats
from pipesched.runtime.checkpoint import is_checkpointing, is_recomputing
from pipesched.runtime.loss_leaves import check_loss_leaves
from pipesched.runtime.loss_normalizer import weighted_loss
from pipesched.runtime.mailbox import StepAborted
from pipesched.plan.record import TaskRecord
from pipesched.runtime.skip.portal import partition, payload
from pipesched.runtime.split_backward import WeightWork, backward_input
from pipesched.runtime.stage_input import on_stage_views, stage_leaf
from pipesched.runtime.stream import TaskClock
from pipesched.runtime.structure import TUPLE, Structure, flatten, unflatten
from pipesched.runtime.step_context import (  # noqa: F401 - re-exported: the task bodies' context
    Boundary,
    PipelineLayout,
    StepContext,
    StepInputs,
    StepLabels,
    StepResults,
)

def run_rank(ctx: StepContext, rank: int, actions: Sequence[Action], records: list[TaskRecord]) -> None:
    """Run ``actions`` in order on the calling (worker) thread, appending a record per task.

    Records are appended as tasks finish (the watchdog counts them) as plain
    ``(action, start, end)`` tuples, and turned into :class:`TaskRecord` once
    the rank stops (also on failure); on a CUDA rank they then get device
    times (:class:`~pipesched.runtime.stream.TaskClock`).

    Each task runs inside ``torch.profiler.record_function("pipesched F1.3")``
    while a torch profiler is active (one global flag read per task when none
    is), and inside an NVTX range of the same name on a CUDA rank, so profiler
    traces and Nsight timelines show the pipeline's tasks beside their kernels.
    """
    device = ctx.layout.devices[rank]
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    clock = TaskClock(stream)
    first = len(records)
    mailbox = ctx.mailbox
    nvtx = stream is not None
    try:
        for action in actions:
            if mailbox.aborted:  # start nothing more of an aborted step (not every task waits on a slot)
                raise StepAborted(mailbox.abort_reason)
            task = _TASKS[action.kind]
            if _profiler._is_profiler_enabled or nvtx:
                start, end = _labelled(task, ctx, rank, action, clock, nvtx)
            else:
                start, end = task(ctx, rank, action, clock)
            records.append((action, start, end))  # type: ignore[arg-type]
    finally:
        records[first:] = [
            TaskRecord(rank, action.stage, action.microbatch, action.kind, start, end)
            for action, start, end in records[first:]  # type: ignore[misc]
        ]
    clock.finish(records, first)


def _labelled(task: Callable[[StepContext, int, Action, TaskClock], tuple[float, float]], ctx: StepContext,
              rank: int, action: Action, clock: TaskClock, nvtx: bool) -> tuple[float, float]:
    """``task`` inside a profiler range (and an NVTX range on CUDA) named ``pipesched <action>``."""
    label = f"pipesched {action}"
    if nvtx:
        torch.cuda.nvtx.range_push(label)
    try:
        if _profiler._is_profiler_enabled:
            with torch.profiler.record_function(label):
                return task(ctx, rank, action, clock)
        return task(ctx, rank, action, clock)
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def _as_boundary(value: object, stage: int) -> Boundary:
    return flatten(value, f"stage {stage}")


def _unwrap(tensors: tuple[Any, ...], structure: Structure) -> Any:
    return unflatten(tensors, structure)


def _stage_function(ctx: StepContext, stage: int, microbatch: int, structure: Structure) -> Callable[[tuple[Tensor, ...]], Any]:
    """The forward of (stage, micro-batch) as a function of its input leaves.

    On the last stage of a training step it also computes the weighted loss,
    so a recompute rebuilds the loss's graph too. A recompute leaves the
    running statistics of the stage's norms alone: the first run applied them.
    """
    module = ctx.layout.stages[stage]
    computes_loss = stage == ctx.num_stages - 1 and ctx.io.computes_loss
    caller = ctx.caller
    io = ctx.io

    def run(inputs: tuple[Tensor, ...]) -> tuple[Boundary, Tensor | None, dict]:
        if caller.autocast or is_recomputing():  # enter only scopes that do something (each costs µs)
            with caller.call_scope(), frozen_running_stats(module if is_recomputing() else None):
                out, loss = _stage_forward(module, stage, microbatch, structure, computes_loss, io, inputs)
        else:
            out, loss = _stage_forward(module, stage, microbatch, structure, computes_loss, io, inputs)
        if not computes_loss:
            return out, None, _NO_SKIPS
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got "
                f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}; "
                f"use a mean- or sum-reduced loss"
            )
        return out, weighted_loss(loss, io.loss_weights[microbatch]), _NO_SKIPS

    return run


#: What a forward stashes for later stages when the model has no skip connection.
_NO_SKIPS: dict = {}


def _stage_forward(module: nn.Module, stage: int, microbatch: int, structure: Structure, computes_loss: bool,
                   io: StepInputs, inputs: tuple[Tensor, ...]) -> tuple[Boundary, Any]:
    """The stage's output as a boundary, and on the last stage of a step the (unweighted) loss."""
    out = _as_boundary(module(_unwrap(inputs, structure)), stage)
    if not computes_loss:
        return out, None
    return out, io.loss_fn(_unwrap(*out), _to_device(io.targets[microbatch], out[0][0].device))  # type: ignore[misc]


def training_flags(stages: Sequence[nn.Module | None]) -> list[bool]:
    """Per stage, whether it runs in training mode (``False`` for a stage not in this process)."""
    return [stage is not None and _training(stage) for stage in stages]


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


def _forward(ctx: StepContext, rank: int, action: Action, clock: TaskClock) -> tuple[float, float]:
    """Run F(stage, micro-batch); return its start and end times.

    The end is taken *before* the output is posted: once posted, the consumer
    may start, and a task must not appear to end after its successor began.
    """
    stage, microbatch = action.stage, action.microbatch
    layout, results = ctx.layout, ctx.results
    device = layout.devices[rank]
    incoming, skip_in = ctx.mailbox.incoming(action), []
    if ctx.skips is not None:
        incoming, skip_in = partition(incoming)
    if not incoming:  # the first stage: the caller's micro-batch
        tensors, structure = ctx.io.microbatches[microbatch]
        start = clock.start()
        tensors = tuple(t.to(device, non_blocking=True) for t in tensors)
        leaves = tuple(stage_leaf(t, ctx.keep and t.requires_grad) for t in tensors)
    else:
        ((_, slot),) = incoming
        packet, structure = slot.get()
        received = layout.transport.receive(packet, rank)
        start = clock.start()
        leaves = tuple(stage_leaf(t, ctx.keep, owned=True) for t in received)
    results.input_structure[(stage, microbatch)] = structure
    run = _stage_function(ctx, stage, microbatch, structure)
    if ctx.skips is not None:  # received skip tensors join the inputs; stashed ones leave with the outputs
        leaves, run = ctx.skips.forward(stage, microbatch, rank, leaves, run, skip_in, ctx.keep)
    # the stage computes on non-leaf aliases of its leaves (an in-place first op is legal), also when recomputed
    run = on_stage_views(run, layout.stages[stage], stage, is_checkpointing)  # type: ignore[arg-type]
    (outputs, out_structure), loss, stashed = ctx.checkpoint.forward(action, rank, leaves, run, keep=ctx.keep)
    outgoing = ctx.mailbox.outgoing(action)
    if not outgoing:  # the last stage: a loss, or the output for the caller
        if loss is not None:
            results.losses[microbatch] = loss.detach()
        else:
            results.outputs[microbatch] = (tuple(o.detach() for o in outputs), out_structure)
        return start, clock.end()
    packets = [(layout.transport.send(payload(transfer, outputs, stashed), rank, transfer.dst), slot,
                out_structure if transfer.edge.skip is None else TUPLE) for transfer, slot in outgoing]
    # stashed skip tensors keep their data here: the meter's answer (cached per forward
    # signature) covers the stage's outputs only; the received copy is the consumer's
    _drop_sent_outputs(outputs, ctx.checkpoint.saved_outputs(stage, microbatch, outputs))
    del stashed
    end = clock.end()
    for packet, slot, sent_structure in packets:
        slot.put((packet, sent_structure))
    return start, end


def _run_backward(roots: list[Tensor], grads: list[Tensor | None]) -> None:
    """``torch.autograd.backward(roots, grads)`` for roots whose data was dropped after sending.

    ``torch.autograd.backward`` compares each gradient's shape with its root's
    current shape, which :func:`_drop_sent_outputs` emptied; the engine itself
    checks gradients against the shapes its graph recorded, so it is called
    directly (as Megatron-LM's ``custom_backward`` does).
    """
    if any(g is None for g in grads):  # only the loss: a scalar root seeded with 1
        grads = [torch.ones_like(r) if g is None else g for r, g in zip(roots, grads)]  # not autograd's checks in Python
    torch.autograd.Variable._execution_engine.run_backward(  # type: ignore[attr-defined]
        tuple(roots), tuple(grads), False, False, (), True, True
    )


#: References to a stage output that only the engine holds, as seen inside
#: :func:`_drop_sent_outputs`: the outputs tuple (kept by the checkpoint
#: manager), the loop variable, and ``sys.getrefcount``'s own argument.
_PRIVATE_REFERENCES = 3


def _drop_sent_outputs(outputs: tuple[Tensor, ...], saved: frozenset[int]) -> None:
    """Let the producer forget the data of outputs it has sent; keep their autograd nodes.

    The backward of (stage, micro-batch) needs its outputs' ``grad_fn`` (the
    roots of its graph), not their values, unless the graph saved an output
    itself (a final ReLU or tanh saves its result: ``saved`` holds the indices
    of those outputs, from the checkpoint manager's saved-tensor meter); those keep their data.
    The sent copy (on the CPU: the same storage, as the consumer's input) is
    the consumer's to keep, so the storage dies with the consumer's backward
    instead of living until the producer's (Megatron-LM frees pipeline outputs
    the same way). Leaves and views keep their data: a leaf has no node to
    keep, and a view's storage belongs to its base. An output the user's code
    still references (a forward hook that collects features, a module that
    caches its last output) keeps its data too: emptying it would change
    what the user sees.
    """
    for index in range(len(outputs)):  # not enumerate: its reused result tuple would hold a reference
        output = outputs[index]
        if output.grad_fn is None or output._base is not None or index in saved:
            continue
        if sys.getrefcount(output) > _PRIVATE_REFERENCES:
            continue  # someone else holds this tensor (a hook, a module attribute): leave it whole
        output.data = torch.empty(0, dtype=output.dtype, device=output.device)


def _backward(ctx: StepContext, rank: int, action: Action, clock: TaskClock) -> tuple[float, float]:
    """Run B(stage, micro-batch); return its start and end times (end before posting).

    A checkpointed forward is recomputed *before* waiting for the incoming
    gradient: the recompute needs only the stage input, which is already
    here, so it fills time the rank would otherwise spend waiting instead of
    delaying the critical path (torchgpipe splits Checkpoint and Recompute for
    the same reason). The record starts at the later of the recompute's start
    and the gradient's arrival, so no task appears to start before its
    input's producer ended; recompute time spent while waiting is bubble put
    to use. (On CUDA the device start is when the rank's stream has both.)
    """
    stage, microbatch = action.stage, action.microbatch
    layout, results = ctx.layout, ctx.results
    incoming, skip_in = ctx.mailbox.incoming(action), []
    if ctx.skips is not None:
        incoming, skip_in = partition(incoming)
    began = time.perf_counter() if incoming else clock.start()
    inputs, ((outputs, _), loss, stashed) = ctx.checkpoint.for_backward(action, rank)
    if incoming:  # the next stage's input gradient
        ((_, slot),) = incoming
        packet, _ = slot.get()
        grads: tuple[Tensor | None, ...] = layout.transport.receive(packet, rank)
        start = clock.start(host=max(began, slot.filled_at))
    else:  # the last stage: from the loss, or from the gradients of pipe(x)'s output
        start = began
        grads = () if ctx.io.computes_loss else tuple(
            None if g is None else g.to(layout.devices[rank], non_blocking=True)
            for g in ctx.io.grad_outputs[microbatch]
        )
    if not incoming and ctx.io.computes_loss:
        roots, root_grads = ([loss], [_loss_seed(ctx.io.loss_seed, loss)]) if loss is not None and loss.requires_grad \
            else ([], [])
        if ctx.io.loss_leaves is not None and roots and microbatch == 0:  # data parallel or multi-process
            allowed, why = ctx.io.loss_leaves  # refuse a stray leaf; one walk a step (see loss_leaves)
            check_loss_leaves(roots, inputs, allowed | {id(p) for p in layout.stages[stage].parameters()}, why)
    else:
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        roots, root_grads = [o for o, _ in pairs], [g for _, g in pairs]
    if skip_in:  # the gradients of what this stage stashed, from the stages that popped them
        skip_roots, skip_grads, _ = ctx.skips.backward_roots(rank, stashed, skip_in)  # type: ignore[union-attr]
        roots, root_grads = roots + skip_roots, root_grads + skip_grads
        del skip_roots, skip_grads
    del outputs, loss, grads, stashed
    if ctx.mailbox.lowering.splits(stage, microbatch):  # B: input gradients only; W later
        input_grads, work = _backward_inputs(ctx, stage, roots, root_grads, inputs)
        del roots, root_grads, inputs
        ctx.checkpoint.defer_weights(action, rank, work)
    else:
        if roots:
            _run_backward(roots, root_grads)
        del roots, root_grads
        input_grads = tuple(x.grad if x.requires_grad else None for x in inputs)
        del inputs
        ctx.checkpoint.release(action, rank)
    popped_grads: dict = _NO_SKIPS
    if ctx.skips is not None:  # the received skip tensors' gradients go back to their stashing stages
        input_grads, popped_grads = ctx.skips.split_input_grads(stage, microbatch, input_grads)
    outgoing = ctx.mailbox.outgoing(action)
    if not outgoing:  # the first stage: gradients of the caller's inputs
        results.input_grads[microbatch] = input_grads
        return start, clock.end()
    packets = [(layout.transport.send(payload(transfer, input_grads, popped_grads), rank, transfer.dst), slot)
               for transfer, slot in outgoing]
    end = clock.end()
    for packet, slot in packets:
        slot.put((packet, TUPLE))
    return start, end


def _loss_seed(seed: Tensor | None, loss: Tensor) -> Tensor | None:
    """The gradient a loss's backward starts from: 1 (``None``), or a loss scale in the loss's dtype."""
    if seed is None:
        return None
    return seed if seed.dtype == loss.dtype and seed.device == loss.device else seed.to(loss.device, loss.dtype)


def _backward_inputs(
    ctx: StepContext, stage: int, roots: list[Tensor], root_grads: list[Tensor | None], inputs: tuple[Tensor, ...]
) -> tuple[tuple[Tensor | None, ...], WeightWork | None]:
    """The B half of a split backward: the inputs' gradients now, the parameters' in W.

    See :mod:`pipesched.runtime.split_backward`: B runs only the input path
    and keeps exactly what W needs (the layers' inputs and incoming gradients).
    """
    if not roots:  # nothing flows back (a micro-batch whose loss weighs 0): W has nothing to do
        return tuple(None for _ in inputs), None
    # W's targets: every leaf the graph reaches that is not an input, not the stage's parameters:
    # an un-split backward accumulates into all of them (a loss's own parameters, a weight it reads)
    module = ctx.layout.stages[stage]
    return backward_input(roots, root_grads, inputs, None, module=module, name=f"stage {stage}")


def _weight(ctx: StepContext, rank: int, action: Action, clock: TaskClock) -> tuple[float, float]:
    """Run W(stage, micro-batch): the parameter gradients its B left for later, then free what it kept."""
    start = clock.start()
    work = ctx.checkpoint.weights(action, rank)
    if work is not None:  # a backward pass: no autocast, as for B (autocast wraps forwards only)
        work.run()
    return start, clock.end()


#: The task body of each action kind.
_TASKS: dict[str, Callable[[StepContext, int, Action, TaskClock], tuple[float, float]]] = {
    "F": _forward, "B": _backward, "W": _weight,
}
