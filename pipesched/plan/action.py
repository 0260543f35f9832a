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

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["F", "B", "W"]
#: F forward, B backward (the input-gradient part when the plan also holds W), W weight gradient.
KINDS: tuple[str, ...] = ("F", "B", "W")

#: A plan: for each rank, the ordered list of actions that rank runs.
Plan = list[list["Action"]]


@dataclass(frozen=True, slots=True, order=True)
class Action:
    """Forward (``"F"``), backward (``"B"``) or weight gradient (``"W"``) of ``stage`` on ``microbatch``."""

    kind: Kind
    stage: int
    microbatch: int
    # Plans are walked through dicts keyed by action (replay, validation, tuning, the
    # runtime), so the hash is computed once. It depends on the process's string-hash
    # seed, hence __reduce__: a pickled action is rebuilt, and rehashed, where it lands.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Action kind must be one of {KINDS}, got {self.kind!r}")
        for name, value in (("stage", self.stage), ("microbatch", self.microbatch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Action {name} must be an int >= 0, got {value!r}")
        object.__setattr__(self, "_hash", hash((self.kind, self.stage, self.microbatch)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, tuple[str, int, int]]:
        return (Action, (self.kind, self.stage, self.microbatch))

    def __str__(self) -> str:
        return f"{self.kind}{self.stage}.{self.microbatch}"


def split_backwards(actions: Any) -> set[tuple[int, int]]:
    """The (stage, micro-batch) pairs whose backward ``actions`` splits (those with a W)."""
    return {(a.stage, a.microbatch) for a in actions if a.kind == "W"}

