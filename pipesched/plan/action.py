"""The unit of work a schedule orders: one forward or backward of one stage on one micro-batch.

An :class:`Action` is a small frozen value so plans are plain data: they can be
printed, compared, hashed into dicts, written to a file and replayed by the
simulator. ``str(Action("F", 3, 1)) == "F3.1"`` reads "forward of stage 3 on
micro-batch 1".

The dependency rule lives here, next to the value it is about, so the plan
validator, the simulator and the runtime all wait for exactly the same things.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["F", "B"]
KINDS: tuple[str, ...] = ("F", "B")

#: A plan: for each rank, the ordered list of actions that rank runs.
Plan = list[list["Action"]]


@dataclass(frozen=True, slots=True, order=True)
class Action:
    """Forward (``"F"``) or backward (``"B"``) of ``stage`` on ``microbatch``."""

    kind: Kind
    stage: int
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Action kind must be one of {KINDS}, got {self.kind!r}")
        for field, value in (("stage", self.stage), ("microbatch", self.microbatch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Action {field} must be an int >= 0, got {value!r}")

    def __str__(self) -> str:
        return f"{self.kind}{self.stage}.{self.microbatch}"


def dependencies(action: Action, num_stages: int) -> tuple[Action, ...]:
    """The actions whose results ``action`` consumes.

    ``F(s, m)`` needs ``F(s-1, m)``'s output. ``B(s, m)`` needs its own
    ``F(s, m)`` (the saved activations, or the input to recompute from) and
    ``B(s+1, m)``'s gradient; the last stage's backward starts from the loss,
    which is computed as part of ``F(last, m)``.
    """
    s, m = action.stage, action.microbatch
    if action.kind == "F":
        return (Action("F", s - 1, m),) if s > 0 else ()
    if s + 1 < num_stages:
        return (Action("F", s, m), Action("B", s + 1, m))
    return (Action("F", s, m),)
