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
from operator import attrgetter
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
    Action objects, flat. Raises :class:`NotFast` for anything that is not a
    list of Action lists, or for duplicates.
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
        self.kind = np.fromiter(map(_KIND_CODE.__getitem__, map(_kind_of, self.actions)), dtype=np.int64, count=size)
        self.stage = np.fromiter(map(_stage_of, self.actions), dtype=np.int64, count=size)
        self.microbatch = np.fromiter(map(_microbatch_of, self.actions), dtype=np.int64, count=size)
        self.rank = np.repeat(np.arange(len(rows), dtype=np.int64), self.lengths)
        top_stage = int(self.stage.max()) + 1 if size else 0
        top_mb = int(self.microbatch.max()) + 1 if size else 0
        self.num_stages = max(num_stages, top_stage)
        self.num_microbatches = max(num_microbatches or 0, top_mb, 1)
        span = len(KINDS) * self.num_stages * self.num_microbatches
        if span > 8 * size + 4096:
            raise NotFast  # sparse micro-batch numbers: a dense key table would dwarf the plan
        self.key = self.key_of(self.kind, self.stage, self.microbatch)
        self.index = np.full(span, -1, dtype=np.int64)
        self.index[self.key] = np.arange(size, dtype=np.int64)
        if size and not np.array_equal(self.index[self.key], np.arange(size)):
            raise NotFast  # an action twice

    def key_of(self, kind: Any, stage: Any, microbatch: Any) -> Any:
        return (kind * self.num_stages + stage) * self.num_microbatches + microbatch

    def find(self, kind: int, stage: Any, microbatch: Any) -> np.ndarray:
        """Flat positions of ``(kind, stage, microbatch)`` (arrays), -1 where absent or out of range."""
        stage = np.asarray(stage)
        inside = (stage >= 0) & (stage < self.num_stages)
        found = self.index[self.key_of(kind, np.where(inside, stage, 0), microbatch)]
        return np.where(inside, found, -1)

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
        """
        kind, stage, mb = self.kind, self.stage, self.microbatch
        is_f, is_b = kind == _F, kind == _B
        first_kind = np.where(is_f, _F, np.where(is_b, _F, _B))
        first_stage = np.where(is_f, stage - 1, stage)
        columns = [(self.find(first_kind, first_stage, mb), ~is_f | (stage > 0))]
        columns.append((self.find(_B, stage + 1, mb), is_b & (stage + 1 < self.num_stages)))
        for skip in skips:
            to_f = is_f & (stage == skip.dst)
            to_b = is_b & (stage == skip.src)
            source = np.where(to_f, self.find(_F, skip.src, mb), self.find(_B, skip.dst, mb))
            columns.append((source, to_f | to_b))
        deps = np.stack([np.where(w, d, -1) for d, w in columns], axis=1)
        wanted = np.stack([w for _, w in columns], axis=1)
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
