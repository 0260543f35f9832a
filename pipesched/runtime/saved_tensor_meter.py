"""The saved-tensor hooks a forward runs under: the activation meter's, the caller's, or both.

The meter (:class:`SavedTensorMeter`) counts the distinct non-parameter
tensors autograd saves in a forward, which is how a stage's activation bytes
are measured (:mod:`pipesched.runtime.checkpoint`). The caller's own
``saved_tensors_hooks`` (captured on the caller's thread, see
:mod:`pipesched.runtime.caller_state`) apply inside every forward, metered or
not.

Both paths give the caller's pack a tensor without its ``grad_fn``. A node
that saves its own output (tanh, sigmoid, exp) would otherwise be handed
that output, which holds the node: a pack that keeps it as it is (a logging
hook, a CPU offload that is a no-op on the CPU) makes a cycle only running
the node breaks, and a split backward's W never runs the input path, so the
stage's whole graph would outlive every step. The data and version counter
are shared, as for any saved tensor, and autograd reattaches the gradient
edge on unpack.

Without the caller's hooks, the meter packs into a
:class:`~pipesched.runtime.saved_tensors.SavedBox` that B can empty: the
audit (``activation_meter="every"``, the first step under ``"once"``) must
not change what B frees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from pipesched.runtime.caller_state import SavedTensorHooks
from pipesched.runtime.saved_tensors import SavedBox

__all__ = ["SavedTensorMeter", "caller_hooks"]


def _key(tensor: Tensor) -> tuple[int, int, int, Any]:
    return (tensor.data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype)


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _without_grad_fn(tensor: Tensor) -> Tensor:
    return tensor.detach() if tensor.grad_fn is not None else tensor


def caller_hooks(user_hooks: SavedTensorHooks | None) -> contextlib.AbstractContextManager[Any]:
    """The caller's saved-tensor hooks alone (no meter), their pack given no ``grad_fn``; or nothing."""
    if user_hooks is None:
        return contextlib.nullcontext()
    user_pack, user_unpack = user_hooks
    return torch.autograd.graph.saved_tensors_hooks(lambda t: user_pack(_without_grad_fn(t)), user_unpack)


class SavedTensorMeter:
    """Collects the distinct non-parameter tensors autograd saves inside the block.

    The caller's own saved-tensor hooks, if any, still apply: the meter looks
    at each tensor, then hands it to the caller's pack hook.
    """

    def __init__(self, exclude: frozenset[int], user_hooks: SavedTensorHooks | None = None):
        self.exclude = exclude
        self.user_hooks = user_hooks
        self.seen: dict[tuple[int, int, int, Any], int] = {}

    def count(self, tensor: Tensor) -> Tensor:
        """Count ``tensor`` (each storage region once, parameters not at all); return it."""
        if tensor.layout == torch.strided and tensor.data_ptr() not in self.exclude:
            self.seen.setdefault(_key(tensor), _nbytes(tensor))
        return tensor

    def add(self, tensors: Iterable[Tensor | None]) -> None:
        for tensor in tensors:
            if tensor is not None:
                self.seen.setdefault(_key(tensor), _nbytes(tensor))

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        if self.user_hooks is None:
            return torch.autograd.graph.saved_tensors_hooks(lambda t: SavedBox.pack(self.count(t)), SavedBox.unpack)
        user_pack, user_unpack = self.user_hooks
        return torch.autograd.graph.saved_tensors_hooks(
            lambda t: user_pack(_without_grad_fn(self.count(t))), user_unpack
        )
