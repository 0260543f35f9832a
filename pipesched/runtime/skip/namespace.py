"""Namespaces keep skip tensors of the same name apart (torchgpipe's ``Namespace``).

A model that uses one skippable class twice stashes the same name twice; each
use is isolated into its own namespace (``Layer().isolate(ns)``), so a skip
tensor is known by ``(namespace, name)``. ``None`` is the default namespace.
"""

from __future__ import annotations

import uuid
from typing import Any


class Namespace:
    """A namespace for isolating skip tensors, see :meth:`Skippable.isolate`.

    Namespaces compare by identity of their random id: two ``Namespace()``
    differ, a copy equals its original. They are ordered (by id) so that keys
    holding one can be sorted, though the order itself means nothing.
    """

    __slots__ = ("id",)

    def __init__(self) -> None:
        self.id = uuid.uuid4()

    def __repr__(self) -> str:
        return f"<Namespace '{self.id}'>"

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Namespace) and self.id == other.id

    def __lt__(self, other: Any) -> bool:
        if not isinstance(other, Namespace):
            return NotImplemented
        return self.id < other.id

    def __copy__(self) -> Namespace:
        copied = Namespace.__new__(Namespace)
        copied.id = self.id
        return copied

    def __deepcopy__(self, memo: dict[int, Any]) -> Namespace:
        return self.__copy__()

    def __getstate__(self) -> uuid.UUID:
        return self.id

    def __setstate__(self, state: uuid.UUID) -> None:
        self.id = state
