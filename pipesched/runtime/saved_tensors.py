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

A slot that already has hooks cannot take new ones. The activation meter's
own hooks therefore pack each tensor into a :class:`SavedBox`, which this
module reads and empties like a plain slot: metering a forward must not
change what B frees (the caller's own hooks pack into objects only the
caller understands; those slots are left as they are).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import Node

__all__ = ["SavedBox", "count_storage", "release_saved", "saved_tensors", "storage_key"]


class SavedBox:
    """A saved tensor behind the meter's hooks, in a box the split backward can empty.

    :meth:`pack` is a ``saved_tensors_hooks`` pack (the meter's, after it
    counted the tensor), :meth:`unpack` its unpack. The box holds the tensor
    without its ``grad_fn``: a node that saves its own output (tanh, exp)
    would otherwise hold a tensor that holds the node, a cycle only running
    the node breaks, and a split backward's W never runs the input path.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor: Tensor | None = tensor.detach() if tensor.grad_fn is not None else tensor

    @classmethod
    def pack(cls, tensor: Tensor) -> SavedBox:
        return cls(tensor)

    @staticmethod
    def unpack(box: SavedBox) -> Tensor:
        if box.tensor is None:
            raise RuntimeError(_RELEASED.format(name="a node"))
        return box.tensor


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
        data = getattr(slot, "data", None)  # a hooked slot's: what its pack returned
        if isinstance(data, SavedBox):
            data = data.tensor
        if isinstance(data, Tensor):
            tensors.append(data)
    return tensors


def release_saved(node: Node) -> None:
    """Let ``node`` forget the tensors it saved, as a plain backward does after running it.

    Registering pack/unpack hooks on a saved tensor packs it at once and
    drops the node's own reference (the documented saved-tensor hooks of
    ``grad_fn._raw_saved_*``); the pack keeps nothing, and the unpack raises
    if anything ever runs this node again. A :class:`SavedBox` (the meter's
    hooks) is emptied instead. A slot with the caller's hooks, or holding no
    tensor, is left as it is.
    """
    for slot in _raw_saved(node):
        data = getattr(slot, "data", None)
        if isinstance(data, SavedBox):
            data.tensor = None
            continue
        if data is None:
            continue
        try:
            slot.register_hooks(_pack_nothing, functools.partial(_unpack_released, node.name()))
        except RuntimeError:
            continue


def _pack_nothing(tensor: Tensor) -> None:
    return None


def _unpack_released(name: str, packed: None) -> Tensor:
    raise RuntimeError(_RELEASED.format(name=name))


_RELEASED = (
    "{name} needs a tensor that the split backward already released: B releases what only the input "
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
