"""A value that crosses a stage boundary: its tensors, plus the structure that rebuilds it.

Everything between stages (micro-batching, transport, the wire between
processes, autograd's per-tensor gradients) works on flat tuples of tensors.
A stage, ``loss_fn`` and the caller of ``pipe(x)`` see the value as the stage
produced it: a Tensor, a non-empty tuple of Tensors, or a non-empty mapping of
``str`` to Tensors (a ``dict``, or a Hugging Face ``ModelOutput``-like
``OrderedDict`` subclass). :func:`flatten` takes a value apart into
``(tensors, structure)``; :func:`unflatten` puts it back together.

A mapping keeps its keys, in order, and its type when ``type(m)(dict)``
rebuilds it with the same keys (``dict``, ``OrderedDict`` and their
subclasses, ``ModelOutput``); otherwise it comes back as a plain ``dict``.

``None`` entries of a tuple or mapping (a Hugging Face layer's empty
attention-weights slot, a model output's absent field) are allowed beside at
least one Tensor: they are no tensors, so the transport, the wire and
autograd never see them, and the structure records where they were
(``absent``), so the receiver gets ``None`` back at the same place, never a
silently shifted tuple nor a tensor it did not send.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

ALLOWED = ("a Tensor, a non-empty tuple of Tensors or a non-empty mapping of str to Tensors "
           "(None entries allowed beside at least one Tensor)")


@dataclass(frozen=True)
class Structure:
    """How to rebuild a value from its flat tensors.

    ``kind`` is ``"tensor"`` (one bare Tensor), ``"tuple"`` or ``"mapping"``;
    a mapping has its ``keys`` (the tensors' order) and its ``mapping_type``.
    """

    kind: str
    keys: tuple[str, ...] = ()
    mapping_type: type = dict
    #: positions (among the tuple's entries or the mapping's keys) that hold ``None``, not a tensor
    absent: tuple[int, ...] = ()

    @property
    def type_name(self) -> str:
        """``module:qualname`` of the mapping type, for another process to find it."""
        return f"{self.mapping_type.__module__}:{self.mapping_type.__qualname__}"


TENSOR = Structure("tensor")
TUPLE = Structure("tuple")


def flatten(value: object, what: str) -> tuple[tuple[Tensor, ...], Structure]:
    """``value``'s tensors and structure, or a ``TypeError`` that starts with ``what``."""
    if isinstance(value, Tensor):
        return (value,), TENSOR
    if isinstance(value, tuple) and _entries_fit(value):
        if all(isinstance(v, Tensor) for v in value):
            return value, TUPLE
        return _present(value), Structure("tuple", absent=_absent(value))
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value) and _entries_fit(value.values()):
        entries = tuple(value.values())
        return _present(entries), Structure("mapping", tuple(value), type(value), _absent(entries))
    if isinstance(value, tuple):
        detail = f" with {[type(v).__name__ for v in value]}"
    elif isinstance(value, Mapping):
        detail = f" with {({repr(k): type(v).__name__ for k, v in value.items()})}"
    else:
        detail = ""
    raise TypeError(f"{what} returned {type(value).__name__}{detail}; it must return {ALLOWED}")


def _entries_fit(entries: Any) -> bool:
    entries = tuple(entries)
    return (any(isinstance(v, Tensor) for v in entries)
            and all(v is None or isinstance(v, Tensor) for v in entries))


def _present(entries: Sequence[Any]) -> tuple[Tensor, ...]:
    return tuple(v for v in entries if v is not None)


def _absent(entries: Sequence[Any]) -> tuple[int, ...]:
    return tuple(i for i, v in enumerate(entries) if v is None)


def unflatten(tensors: Sequence[Any], structure: Structure) -> Any:
    """The value ``flatten`` took apart, rebuilt around ``tensors`` (same count and order), with
    ``None`` back where the structure records one."""
    if structure.kind == "tensor":
        return tensors[0]
    if structure.absent:
        given = iter(tensors)
        count = len(tensors) + len(structure.absent)
        tensors = [None if i in structure.absent else next(given) for i in range(count)]
    if structure.kind == "tuple":
        return tuple(tensors)
    return _rebuild(structure, dict(zip(structure.keys, tensors)))


_REBUILDS: dict[tuple[type, tuple[str, ...]], bool] = {}


def _rebuild(structure: Structure, items: dict[str, Any]) -> Mapping[str, Any]:
    """``mapping_type(items)`` when that gives a mapping with the same keys, else ``items``.

    Whether it does is learnt once per (type, keys): a type whose constructor
    takes other arguments costs one failed call, not one per micro-batch.
    """
    kind = structure.mapping_type
    if kind is dict:
        return items
    key = (kind, structure.keys)
    if _REBUILDS.get(key, True):
        try:
            rebuilt = kind(items)
            if isinstance(rebuilt, Mapping) and tuple(rebuilt.keys()) == structure.keys:
                _REBUILDS[key] = True
                return rebuilt
        except Exception:  # noqa: BLE001 - any constructor failure means: use a dict
            pass
        _REBUILDS[key] = False
    return items


def mapping_type_named(name: str) -> type:
    """The class ``module:qualname`` names, if this process has that module loaded; else ``dict``.

    Only modules already imported are looked in: a peer's message never makes
    this process import anything.
    """
    module_name, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) and issubclass(found, Mapping) else dict
