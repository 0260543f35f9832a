"""The unit of work a schedule orders: one forward, backward or weight-gradient pass of one stage.

An :class:`Action` is a small frozen value so plans are plain data: they can be
printed, compared, hashed into dicts, written to a file and replayed by the
simulator. ``str(Action("F", 3, 1)) == "F3.1"`` reads "forward of stage 3 on
micro-batch 1"; ``str(Action("W", 2, 3)) == "W2.3"`` reads "weight gradient of
stage 2 on micro-batch 3".

A backward is split or whole per (stage, micro-batch), and the plan says which:
when ``W(s, m)`` is in the plan, ``B(s, m)`` computes only the input gradient
(what the previous stage waits for) and ``W(s, m)`` the parameter gradients,
later, on the same rank; without ``W(s, m)``, ``B(s, m)`` is the whole backward.
Zero-bubble schedules split backwards so that the W passes, which nobody waits
for, can fill the pipeline's bubbles.

What each action waits for is written once, in
:func:`pipesched.plan.lowering.inputs_of` (and :func:`pipesched.plan.lowering.dependencies`).
This module sits below the lowering and imports nothing of the plan layer, so
the layer's imports point one way: ``action`` < ``lowering`` < the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["F", "B", "W"]
#: F forward, B backward (the input-gradient part when the plan also holds W), W weight gradient.
KINDS: tuple[str, ...] = ("F", "B", "W")

#: A plan: for each rank, the ordered list of actions that rank runs.
Plan = list[list["Action"]]


class _HashSlot:
    """Where an :class:`Action` keeps its hash once asked for it (a slot, not a dataclass field)."""

    __slots__ = ("_hash",)


@dataclass(frozen=True, slots=True, order=True, init=False)
class Action(_HashSlot):
    """Forward (``"F"``), backward (``"B"``) or weight gradient (``"W"``) of ``stage`` on ``microbatch``."""

    kind: Kind
    stage: int
    microbatch: int

    def __init__(self, kind: Kind, stage: int, microbatch: int) -> None:
        # A plan at cluster scale holds millions of actions, so the common case (an exact
        # int, a known kind) is one test, and the fields are set through the slots'
        # descriptors rather than the frozen class's refusing __setattr__.
        if not (kind in _KIND_SET and type(stage) is int and type(microbatch) is int
                and stage >= 0 and microbatch >= 0):
            _check_fields(kind, stage, microbatch)
        _set_kind(self, kind)
        _set_stage(self, stage)
        _set_microbatch(self, microbatch)

    def __hash__(self) -> int:
        # Plans are walked through dicts keyed by action (replay, validation, tuning, the
        # runtime), so the hash is computed once, when first asked for (many actions of a
        # large plan never are). It depends on the process's string-hash seed, hence
        # __reduce__: a pickled action is rebuilt, and rehashed, where it lands.
        try:
            return self._hash
        except AttributeError:
            value = hash((self.kind, self.stage, self.microbatch))
            _set_hash(self, value)
            return value

    def __reduce__(self) -> tuple[Any, tuple[str, int, int]]:
        return (Action, (self.kind, self.stage, self.microbatch))

    def __str__(self) -> str:
        return f"{self.kind}{self.stage}.{self.microbatch}"


_KIND_SET = frozenset(KINDS)
_set_kind = Action.kind.__set__  # type: ignore[attr-defined]
_set_stage = Action.stage.__set__  # type: ignore[attr-defined]
_set_microbatch = Action.microbatch.__set__  # type: ignore[attr-defined]
_set_hash = _HashSlot._hash.__set__  # type: ignore[attr-defined]


def _check_fields(kind: object, stage: object, microbatch: object) -> None:
    """The slow path of ``Action(...)``: raise the error that names a bad field (int subclasses pass)."""
    if kind not in KINDS:
        raise ValueError(f"Action kind must be one of {KINDS}, got {kind!r}")
    for name, value in (("stage", stage), ("microbatch", microbatch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Action {name} must be an int >= 0, got {value!r}")


def split_backwards(actions: Any) -> set[tuple[int, int]]:
    """The (stage, micro-batch) pairs whose backward ``actions`` splits (those with a W)."""
    return {(a.stage, a.microbatch) for a in actions if a.kind == "W"}

