"""Per-stage costs from measured task records: the median seconds of each ``(kind, stage)``.

A schedule built for the model's costs (``wants_costs``) is handed these after
every step. The median, not the mean: a step's first tasks pay for warm-up
(allocations, lazy initialisation, a thread waking up), and one slow task
should not make a stage look slow.

Backwards are told apart as the simulator tells them apart: a ``B`` record
with a ``W`` record of the same stage and micro-batch is the input-gradient
part of a split backward, and ``("B", s)`` is the median of those; a stage
whose backwards all ran whole gets ``("B", s)`` = the whole backward and no
``("W", s)``, which a cost table reads as "this stage's backward is not split".
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

__all__ = ["median_costs"]


def median_costs(records: Iterable[Any]) -> dict[tuple[str, int], float]:
    """``{(kind, stage): median seconds}`` over ``records`` (anything with kind, stage, microbatch, start, end)."""
    rows = [(r.kind, r.stage, r.microbatch, float(r.end) - float(r.start)) for r in records]
    split = {(stage, mb) for kind, stage, mb, _ in rows if kind == "W"}
    split_stages = {stage for stage, _ in split}
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    for kind, stage, mb, seconds in rows:
        if kind == "B" and stage in split_stages and (stage, mb) not in split:
            continue  # a whole backward of a stage measured split too: its parts are what a table prices
        durations[(kind, stage)].append(seconds)
    return {key: statistics.median(values) for key, values in sorted(durations.items())}
