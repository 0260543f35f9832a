"""A stage's inputs: leaves the gradients are read from, and what the stage computes on.

Autograd is cut at every stage boundary, so each input of a stage (its
activation, a received skip tensor, a recompute's copy of either) is a fresh
leaf that requires grad: the engine reads the stage's input gradients off
those leaves (``leaf.grad``, or ``autograd.grad(..., leaves)`` in a split
backward). Every place that makes such a leaf uses :func:`stage_leaf`.

Why the stage must not compute on the leaf itself: autograd forbids an
in-place op on a leaf that requires grad, and on any view of one. In the
un-pipelined model the same tensor is an intermediate result, on which
``nn.ReLU(inplace=True)`` is legal; so a cut right before an in-place layer
(everywhere in VGG-style ``features``, and a cut ``balance_by_time`` or
``tune`` may choose) would fail where the plain model runs. The stage
therefore runs on :func:`stage_views` of its leaves: the output of an
identity autograd function, which shares the leaf's storage (no copy) but
is neither a leaf nor a view for autograd, so an in-place op on it is
recorded like one on any intermediate result, and its gradient flows
through the identity into the leaf. torchgpipe's partitions got the same
from the non-leaf outputs of its ``Wait`` function.

An in-place first op writes into the leaf's storage (and, on the CPU, into
the sending stage's output), as in the plain model it writes into the
previous layer's output; autograd's version counter catches a write into a
tensor some backward still needs, in both. A checkpointed forward and its
recompute write into copies instead (:func:`on_stage_views`): the recompute
needs the input as received.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


def stage_leaf(tensor: Tensor, wants_grad: bool, *, owned: bool = False) -> Tensor:
    """A leaf on ``tensor``'s data for a stage's graph, requiring grad if ``wants_grad`` and its dtype can.

    ``owned``: ``tensor`` was received from another stage, is already
    detached by the sender (:meth:`Transport.send`) and belongs to this
    consumer alone, so it becomes the leaf itself: one detach per boundary,
    not two. Otherwise (a caller's micro-batch, a checkpoint's held input)
    the leaf is always a new tensor: the original must stay as it is.
    """
    if owned and tensor.grad_fn is None and not tensor.requires_grad and tensor._base is None:
        leaf = tensor
    else:
        leaf = tensor.detach()
    if wants_grad and (leaf.is_floating_point() or leaf.is_complex()):
        leaf.requires_grad_(True)
    return leaf


class _StageInput(torch.autograd.Function):
    """The identity, whose output autograd treats as an intermediate result (not a leaf, not a view)."""

    @staticmethod
    def forward(ctx: Any, leaf: Tensor) -> Tensor:  # type: ignore[override]
        # detach(), not the leaf itself: an input returned as is would be a view of it
        return leaf.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def stage_views(leaves: tuple[Tensor, ...], copy: tuple[bool, ...] | None = None) -> tuple[Tensor, ...]:
    """What a stage computes on: per leaf, an alias of its data the stage may modify in place.

    A leaf that needs no gradient, or any leaf while grad mode is off (a
    checkpointed first run, evaluation), already allows in-place ops, and
    is passed as it is (the identity is an autograd Function call: some 10 µs).
    ``copy[i]``: give input ``i`` a copy instead (a differentiable clone,
    whose gradient still reaches the leaf), so the stage writes into no
    data but its own.
    """
    grad = torch.is_grad_enabled()
    if copy is None:
        if not grad:
            return leaves
        copy = (False,) * len(leaves)
    return tuple(x.clone() if c else _StageInput.apply(x) if grad and x.requires_grad else x
                 for x, c in zip(leaves, copy))


#: Per stage (its module), which of its inputs its forward writes into, as its first checkpointed run showed.
_WRITES: weakref.WeakKeyDictionary[nn.Module, tuple[bool, ...]] = weakref.WeakKeyDictionary()


def on_stage_views(run: Callable[[tuple[Tensor, ...]], T], stage: nn.Module, index: int,
                   checkpointing: Callable[[], bool]) -> Callable[[tuple[Tensor, ...]], T]:
    """``run`` of one (stage, micro-batch), called on :func:`stage_views` of the leaves it is given.

    The first call is the forward's first run, a later one its recompute
    (on fresh leaves of the same data). A stage that starts with an
    in-place op writes into its input: autograd's version counter tells.
    The recompute must start from the input as it was, and must not write
    into the held data either (on the CPU it is shared with the previous
    stage's sent output and, for a stage whose output is its written input,
    with the next stage's input, whose backward may still need it). So:

    * a checkpointed first run (``checkpointing()``) runs on a copy of each
      input the stage writes into, learned per stage on its first
      checkpointed run (which copies every input), so the held input stays
      as received; in-place ops that are not idempotent (``x.mul_(2)``)
      recompute exactly too;
    * a recompute runs on a copy of each input its first run wrote into.

    A stage that writes into an input on some micro-batches only, after a
    checkpointed run showed it does not, is refused with the fix: its held
    input is lost.
    """
    writes: list[tuple[bool, ...]] = []

    def on_views(leaves: tuple[Tensor, ...]) -> T:
        if writes:  # a recompute
            return run(stage_views(leaves, copy=writes[0]))
        copy = None
        if checkpointing():
            known = _WRITES.get(stage)
            copy = known if known is not None and len(known) == len(leaves) else (True,) * len(leaves)
        inputs = stage_views(leaves, copy)
        before = [_version(x) for x in inputs]
        result = run(inputs)
        wrote = tuple(v is not None and _version(x) != v for x, v in zip(inputs, before))
        if copy is not None:
            lost = [i for i, (w, c) in enumerate(zip(wrote, copy)) if w and not c]
            if lost:
                raise RuntimeError(
                    f"stage {index} wrote into its input {lost[0]} in place (an in-place op such as "
                    f"nn.ReLU(inplace=True) or x.mul_() on the stage's input) on this micro-batch but not "
                    f"on an earlier checkpointed one, so the input its recompute needs is lost; make the op "
                    f"out of place (inplace=False, or clone() the input first), or use checkpoint='never'"
                )
            _WRITES[stage] = wrote
        writes.append(wrote)
        return result

    return on_views


def _version(tensor: Tensor) -> int | None:
    """Autograd's count of in-place writes into ``tensor``; ``None`` for an inference tensor (no count, no recompute)."""
    return None if tensor.is_inference() else tensor._version
