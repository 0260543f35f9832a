"""Timelines as pictures: a Chrome/Perfetto trace, and a Gantt chart PNG.

The trace opens in ui.perfetto.dev or chrome://tracing: one track per rank,
one complete event per task (micro-batch and kind in its args), and, for
multi-process pipelines, a communication track beside each rank. The chart
needs matplotlib (the ``pipesched[plot]`` extra), imported only when drawing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Protocol

from pipesched.observe.report import CommRecord
from pipesched.observe.units import seconds
from pipesched.plan.record import TaskRecord


class Drawable(Protocol):
    """What the exports read of a timeline (:class:`~pipesched.observe.timeline.Timeline` has it).

    Stated here rather than imported, so the exports depend on data, not on
    the analysis module that uses them.
    """

    tasks: Sequence[TaskRecord]
    comm: Sequence[CommRecord]
    num_ranks: int
    schedule: str | None

    @property
    def makespan(self) -> float: ...

#: Chrome-trace thread id of rank r's communication track: COMM_TRACK + r.
COMM_TRACK = 1000

#: Trace category and Gantt colour of each task kind: forward blue, backward orange,
#: a split backward's weight-gradient pass (W) green.
CATEGORY = {"F": "forward", "B": "backward", "W": "weight"}
COLORS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868"}

_MISSING_MATPLOTLIB = (
    "Timeline.to_gantt_png needs matplotlib: install pipesched[plot] or pip install matplotlib"
)


def chrome_trace(timeline: Drawable, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Chrome/Perfetto trace: one complete (``"X"``) event per task, one track per rank.

    Times are microseconds from the first task's start. Written to ``path``
    as JSON when given (open it at ui.perfetto.dev or chrome://tracing);
    returned either way.
    """
    origin = timeline.tasks[0].start
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"pipesched {timeline.schedule or ''}".strip()}}
    ]
    for rank in range(timeline.num_ranks):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
    for t in timeline.tasks:
        events.append({
            "name": f"{t.kind}{t.stage}.{t.microbatch}",
            "cat": CATEGORY.get(t.kind, t.kind),
            "ph": "X",
            "ts": (t.start - origin) * 1e6,
            "dur": (t.end - t.start) * 1e6,
            "pid": 0,
            "tid": t.rank,
            "args": {"stage": t.stage, "microbatch": t.microbatch, "kind": t.kind},
        })
    for rank in sorted({c.rank for c in timeline.comm}):
        tid = COMM_TRACK + rank
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid,
                       "args": {"name": f"rank {rank} comm"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": tid,
                       "args": {"sort_index": rank + 0.5}})
    for c in timeline.comm:
        arrow = "to" if c.kind == "send" else "from"
        events.append({
            "name": f"{c.kind} {c.action} {arrow} rank {c.peer}",
            "cat": "comm",
            "ph": "X",
            "ts": (c.start - origin) * 1e6,
            "dur": max(c.end - c.start, 0.0) * 1e6,
            "pid": 0,
            "tid": COMM_TRACK + c.rank,
            "args": {"peer": c.peer, "action": c.action, "bytes": c.nbytes},
        })
    trace = {"traceEvents": events, "displayTimeUnit": "ms"}
    if path is not None:
        Path(path).write_text(json.dumps(trace), encoding="utf-8")
    return trace


def gantt_png(timeline: Drawable, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Draw one row per rank, one bar per task (F blue, B orange, W green), and save a PNG.

    Needs matplotlib (``pip install pipesched[plot]``); imported here so the
    library does not depend on it. Uses the object API, not pyplot, so it
    neither opens windows nor changes the caller's matplotlib backend.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as error:
        raise ImportError(_MISSING_MATPLOTLIB) from error

    origin, span = timeline.tasks[0].start, timeline.makespan
    scale, unit = (1e3, "ms") if span < 1.0 else (1.0, "s")
    colors = COLORS
    inches, dpi = max(6.0, min(16.0, 4.0 + 0.45 * len(timeline.tasks) / timeline.num_ranks)), 120
    figure = Figure(figsize=(inches, 1.0 + 0.5 * timeline.num_ranks), dpi=dpi)
    axes = figure.add_subplot()
    plot_px = 0.75 * inches * dpi  # roughly the axes' width; labels only where they fit
    for t in timeline.tasks:
        left, width = (t.start - origin) * scale, (t.end - t.start) * scale
        axes.barh(t.rank, width, left=left, height=0.8, color=colors[t.kind], edgecolor="white", linewidth=0.5)
        label = f"{t.kind}{t.stage}.{t.microbatch}"
        if span > 0 and (t.end - t.start) / span * plot_px > 6.0 * len(label):
            axes.text(left + width / 2, t.rank, label, ha="center", va="center", fontsize=7, color="white")
    axes.set_yticks(range(timeline.num_ranks), [f"rank {r}" for r in range(timeline.num_ranks)])
    axes.set_ylim(timeline.num_ranks - 0.5, -0.5)  # rank 0 on top
    axes.set_xlabel(unit)
    split = any(t.kind == "W" for t in timeline.tasks)
    labels = {"F": "forward", "B": "backward (input grad)" if split else "backward", "W": "weight grad"}
    axes.legend(handles=[Patch(color=colors[k], label=labels[k]) for k in ("FBW" if split else "FB")],
                loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    axes.set_title(title or f"{timeline.schedule or 'pipeline'}: makespan {seconds(span)}")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png", dpi=dpi)
    return path
