"""Reading and releasing what an autograd node saved for its backward, and counting its bytes.

A node (``tensor.grad_fn`` and what it leads to) keeps the tensors its
backward will need: a matrix product its input, a GELU its input, a dropout
its mask. The split backward (:mod:`pipesched.runtime.split_backward`) has
to reach them directly, which a plain backward never does: B frees the ones
only the input path needed (W will not run those nodes), and W reports the
bytes it keeps alive until it runs and frees what it kept once it ran or its
step was cancelled. This module is that access to the node's saved-tensor
slots (``grad_fn._raw_saved_*``, each a ``torch._C._autograd.SavedTensor``)
and nothing else, so the one place that leans on these torch internals is
small and easy to find when a torch release changes them.

Reading does not unpack a slot (no saved-tensor hook runs); releasing
registers pack/unpack hooks on the slot, which is how torch lets a saved
tensor go without running the node. Bytes are counted per storage, once,
so views and tensors saved by two nodes are not counted twice.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import Node

__all__ = ["count_storage", "release_saved", "saved_tensors", "storage_key"]


def _raw_saved(node: Node) -> list[Any]:
    """The node's saved-tensor slots (``torch._C._autograd.SavedTensor``), documented as ``_raw_saved_*``."""
    names = _RAW_SAVED_NAMES.get(type(node))
    if names is None:
        names = _RAW_SAVED_NAMES[type(node)] = [n for n in dir(node) if n.startswith("_raw_saved_")]
    slots: list[Any] = []
    for name in names:
        try:
            value = getattr(node, name)
        except RuntimeError:  # already freed
            continue
        if isinstance(value, (list, tuple)):
            slots.extend(v for v in value if v is not None)
        elif value is not None:
            slots.append(value)
    return slots


_RAW_SAVED_NAMES: dict[type, list[str]] = {}


def saved_tensors(node: Node) -> list[Tensor]:
    """The tensors ``node`` holds for its backward, read without unpacking (no saved-tensor hook runs)."""
    tensors = []
    for slot in _raw_saved(node):
        data = getattr(slot, "data", None)
        if isinstance(data, Tensor):
            tensors.append(data)
    return tensors


def release_saved(node: Node) -> None:
    """Let ``node`` forget the tensors it saved, as a plain backward does after running it.

    Registering pack/unpack hooks on a saved tensor packs it at once and
    drops the node's own reference (the documented saved-tensor hooks of
    ``grad_fn._raw_saved_*``); the pack keeps nothing, and the unpack raises
    if anything ever runs this node again. A slot that already has hooks, or
    holds no tensor, is left as it is.
    """
    for slot in _raw_saved(node):
        if getattr(slot, "data", None) is None:
            continue
        try:
            slot.register_hooks(_pack_nothing, functools.partial(_unpack_released, node.name()))
        except RuntimeError:
            continue


def _pack_nothing(tensor: Tensor) -> None:
    return None


def _unpack_released(name: str, packed: None) -> Tensor:
    raise RuntimeError(
        f"{name} needs a tensor that the split backward already released: B releases what only the input "
        "gradients need and W what the parameter gradients needed; this graph cannot be back-propagated again "
        "(as after a plain backward without retain_graph)"
    )


def storage_key(tensor: Tensor) -> tuple[Any, ...]:
    """The key :func:`count_storage` counts ``tensor``'s bytes under: its device and storage (else itself)."""
    if tensor.layout != torch.strided:
        return (tensor.device, id(tensor))
    return (tensor.device, tensor.untyped_storage().data_ptr())


def count_storage(sizes: dict[tuple[Any, ...], int], tensor: Tensor | None, exclude: set[tuple[Any, ...]]) -> None:
    """Count ``tensor``'s storage once in ``sizes`` (a sparse gradient: its indices and values)."""
    if tensor is None:
        return
    if tensor.layout == torch.sparse_coo:
        count_storage(sizes, tensor._indices(), exclude)
        count_storage(sizes, tensor._values(), exclude)
        return
    if tensor.layout != torch.strided:
        return
    storage = tensor.untyped_storage()
    if storage.data_ptr() == 0:
        return
    key = (tensor.device, storage.data_ptr())
    if key not in exclude:
        sizes[key] = storage.nbytes()
