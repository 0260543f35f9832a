"""A plan as integer arrays: what the fast validator and simulator work on.

A plan at cluster scale (256 ranks, 4096 micro-batches, two million actions)
is too big to walk through dicts keyed by :class:`~pipesched.plan.action.Action`
(tens of microseconds an action in CPython). Here it is read once into numpy
arrays, in plan order (rank 0's list, then rank 1's, ...), and every action
gets a dense integer *key*::

    key = (kind * num_stages + stage) * num_microbatches + microbatch     kind: F=0, B=1, W=2

``index[key]`` is the action's position in that flat order (-1: not in the
plan), so the dependency rule of :func:`pipesched.plan.lowering.inputs_of`
becomes arithmetic on whole columns (:meth:`PlanArrays.dependencies`), in the
same order as ``inputs_of`` lists the edges (the order decides which input a
tie is blamed on, see :mod:`pipesched.plan.fast_replay`).

:class:`NotFast` says "the arrays cannot answer this exactly": a malformed
plan, an action that is not an ``Action``, a key space far larger than the
plan. The callers then run the reference (dict-based) code, which raises its
own, precise error, so the fast path never changes what an error says.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from operator import attrgetter, is_
from typing import Any

import numpy as np

from pipesched.plan.action import KINDS, Action
from pipesched.plan.lowering import Skips

__all__ = ["ActionTable", "NotFast", "PlanArrays"]

_KIND_CODE = {kind: code for code, kind in enumerate(KINDS)}
_F, _B, _W = (_KIND_CODE[k] for k in "FBW")
_kind_of, _stage_of, _microbatch_of = attrgetter("kind"), attrgetter("stage"), attrgetter("microbatch")


class NotFast(Exception):
    """The fast path cannot answer exactly; run the reference implementation (it names the problem)."""


class PlanArrays:
    """``plan`` (one action list per rank) flattened into columns, with a key index.

    Attributes (numpy arrays over the flat order, length ``size``): ``kind``
    (0, 1, 2 for F, B, W), ``stage``, ``microbatch``, ``rank``, ``key``;
    ``offsets[r]`` / ``lengths[r]``: where rank r's list sits in the flat
    order; ``index``: key -> flat position or -1. ``actions``: the plan's own
    Action objects, flat; ``rows``: their list per rank. Raises
    :class:`NotFast` for anything that is not a list of Action lists, or
    for duplicates. Integers are 32-bit where they fit (half the memory
    traffic of every pass).
    """

    def __init__(self, plan: Sequence[Sequence[Action]], num_stages: int, num_microbatches: int | None = None):
        if isinstance(plan, (str, bytes)) or not isinstance(plan, Sequence):
            raise NotFast
        rows = []
        for row in plan:
            if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
                raise NotFast
            rows.append(row)
        self.actions: list[Action] = list(chain.from_iterable(rows))
        size = self.size = len(self.actions)
        if size and set(map(type, self.actions)) != {Action}:
            raise NotFast
        self.num_ranks = len(rows)
        self.lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)[:-1])).astype(np.int64)
        stage = np.fromiter(map(_stage_of, self.actions), dtype=np.int64, count=size)
        microbatch = np.fromiter(map(_microbatch_of, self.actions), dtype=np.int64, count=size)
        self.num_stages = max(num_stages, int(stage.max()) + 1 if size else 0)
        self.num_microbatches = max(num_microbatches or 0, int(microbatch.max()) + 1 if size else 0, 1)
        span = len(KINDS) * self.num_stages * self.num_microbatches
        if span > 8 * size + 4096:
            raise NotFast  # sparse micro-batch numbers: a dense key table would dwarf the plan
        self.dtype = np.int32 if span < 2**31 else np.int64
        self.stage = stage.astype(self.dtype)
        self.microbatch = microbatch.astype(self.dtype)
        self.kind = np.fromiter(map(_KIND_CODE.__getitem__, map(_kind_of, self.actions)), dtype=self.dtype, count=size)
        self.rank = np.repeat(np.arange(len(rows), dtype=self.dtype), self.lengths)
        self.key = self.key_of(self.kind, self.stage, self.microbatch)
        self.index = np.full(span, -1, dtype=self.dtype)
        self.index[self.key] = np.arange(size, dtype=self.dtype)
        if size and not np.array_equal(self.index[self.key], np.arange(size)):
            raise NotFast  # an action twice
        self._dependencies: dict[Skips, tuple[np.ndarray, np.ndarray]] = {}

    def describes(self, plan: Sequence[Sequence[Action]]) -> bool:
        """Whether ``plan`` still holds exactly these actions, the very objects, rank by rank."""
        if len(plan) != self.num_ranks or any(len(row) != n for row, n in zip(plan, self.lengths.tolist())):
            return False
        return all(map(is_, chain.from_iterable(plan), self.actions))

    def key_of(self, kind: Any, stage: Any, microbatch: Any) -> Any:
        return (kind * self.num_stages + stage) * self.num_microbatches + microbatch

    def at(self, keys: np.ndarray, wanted: np.ndarray | None = None) -> np.ndarray:
        """Flat positions of ``keys`` (-1: no such action, or not ``wanted``)."""
        inside = (keys >= 0) & (keys < self.index.size)
        if wanted is not None:
            inside &= wanted
        return np.where(inside, self.index[np.where(inside, keys, 0)], -1)

    def partner(self, kind: int) -> np.ndarray:
        """Per action, the flat position of the action of ``kind`` with the same stage and micro-batch (-1: none)."""
        return self.at(self.key + (kind - self.kind) * (self.num_stages * self.num_microbatches))

    def position(self, action: Any) -> int:
        """Flat position of ``action``, or -1 when the plan does not hold it."""
        if type(action) is not Action or action.stage >= self.num_stages or action.microbatch >= self.num_microbatches:
            return -1
        return int(self.index[self.key_of(_KIND_CODE[action.kind], action.stage, action.microbatch)])

    def dependencies(self, skips: Skips = ()) -> tuple[np.ndarray, np.ndarray]:
        """``(deps, wanted)``: per action, the flat positions of its inputs (-1: none, or missing).

        Columns follow :func:`~pipesched.plan.lowering.inputs_of`: F's previous
        stage, or B's own F, or W's B; then B's next stage; then one column
        per skip edge. ``wanted`` marks the cells the rule asks for, so
        ``wanted & (deps < 0)`` are the inputs no action of the plan makes.
        Keys differ by fixed offsets along the rule (one stage is
        ``num_microbatches`` keys, one kind ``num_stages * num_microbatches``),
        which makes each column one addition and one lookup. Kept per ``skips``.
        """
        if skips in self._dependencies:
            return self._dependencies[skips]
        kind, stage, key = self.kind, self.stage, self.key
        per_stage, per_kind = self.num_microbatches, self.num_stages * self.num_microbatches
        is_f, is_b = kind == _F, kind == _B
        first_wanted = ~is_f | (stage > 0)
        columns = [(np.where(is_f, key - per_stage, key - per_kind), first_wanted)]
        columns.append((key + per_stage, is_b & (stage + 1 < self.num_stages)))
        for skip in skips:
            to_f = is_f & (stage == skip.dst)
            to_b = is_b & (stage == skip.src)
            jump = (skip.src - skip.dst) * per_stage
            columns.append((np.where(to_f, key + jump, key - jump), to_f | to_b))
        deps = np.stack([self.at(keys, wanted) for keys, wanted in columns], axis=1)
        wanted = np.stack([wanted for _, wanted in columns], axis=1)
        self._dependencies[skips] = deps, wanted
        return deps, wanted


class ActionTable(Mapping[Action, Any]):
    """A read-only ``{action: value}`` over a :class:`PlanArrays`, in plan order, built on demand.

    Two million actions would take seconds to put in a dict (each insertion
    calls ``Action.__hash__``); a lookup here is arithmetic on the action's
    fields. Compares equal to a dict with the same items.
    """

    def __init__(self, arrays: PlanArrays, values: np.ndarray):
        self._arrays = arrays
        self._values = values

    def __getitem__(self, action: Action) -> Any:
        position = self._arrays.position(action)
        if position < 0:
            raise KeyError(action)
        return self._values[position].item()

    def __contains__(self, action: object) -> bool:
        return self._arrays.position(action) >= 0

    def __iter__(self) -> Iterator[Action]:
        return iter(self._arrays.actions)

    def __len__(self) -> int:
        return self._arrays.size

    def values_array(self) -> np.ndarray:
        """The values in plan order, as the array they are kept in (read it, do not write it)."""
        return self._values

    def __repr__(self) -> str:
        shown = ", ".join(f"{a}: {v!r}" for a, v in zip(self._arrays.actions[:6], self._values[:6].tolist()))
        return f"ActionTable({{{shown}{', ...' if len(self) > 6 else ''}}})"
