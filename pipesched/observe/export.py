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
    step: int | None
    peak_activation_bytes: Sequence[int] | None

    @property
    def makespan(self) -> float: ...

#: Chrome-trace thread id of rank r's communication track: COMM_TRACK + r.
COMM_TRACK = 1000
#: Chrome-trace thread id of the "steps" track (step slices, the gaps between steps), drawn on top.
STEP_TRACK = 999_999

#: Trace category and Gantt colour of each task kind: forward blue, backward orange,
#: a split backward's weight-gradient pass (W) green.
CATEGORY = {"F": "forward", "B": "backward", "W": "weight"}
COLORS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868"}

_MISSING_MATPLOTLIB = (
    "Timeline.to_gantt_png needs matplotlib: install pipesched[plot] or pip install matplotlib"
)


def chrome_trace(timeline: Drawable, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Chrome/Perfetto trace of one step: :func:`chrome_trace_steps` of ``[timeline]``."""
    return chrome_trace_steps([timeline], path)


def chrome_trace_steps(
    timelines: Sequence[Drawable], path: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Chrome/Perfetto trace of several steps on one clock: every task, the step boundaries, the gaps.

    * one complete (``"X"``) event per task, on its rank's track (and one per
      transfer on the rank's communication track): the ``"X"`` events are
      exactly the tasks and transfers;
    * a "steps" track on top: a slice per step (``"B"``/``"E"``: its makespan,
      peak activation bytes per rank when known) and a slice for each gap
      between consecutive steps, where the training loop's own work runs
      (optimizer step, data loading, logging);
    * a global instant (``"i"``, a vertical line across every track) where each
      step begins and ends.

    Times are microseconds from the first step's first task; ``timelines`` in
    the order they ran. Written to ``path`` as JSON when given (open it at
    ui.perfetto.dev or chrome://tracing); returned either way.
    """
    if not timelines:
        raise ValueError("chrome_trace_steps needs at least one timeline")
    origin = min(t.tasks[0].start for t in timelines)
    schedules = list(dict.fromkeys(t.schedule for t in timelines if t.schedule))
    ranks = max(t.num_ranks for t in timelines)
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": " ".join(["pipesched", *schedules])}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": STEP_TRACK, "args": {"name": "steps"}},
        {"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": STEP_TRACK, "args": {"sort_index": -1}},
    ]
    for rank in range(ranks):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
    for rank in sorted({c.rank for t in timelines for c in t.comm}):
        tid = COMM_TRACK + rank
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid,
                       "args": {"name": f"rank {rank} comm"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": tid,
                       "args": {"sort_index": rank + 0.5}})
    previous_end: float | None = None
    for index, timeline in enumerate(timelines):
        first, last = timeline.tasks[0].start, max(t.end for t in timeline.tasks)
        label = f"step {timeline.step if timeline.step is not None else index}"
        if previous_end is not None and first > previous_end:
            events += _span(f"between steps ({seconds(first - previous_end)})", "gap", previous_end, first, origin,
                            {"seconds": first - previous_end,
                             "what": "the training loop's own work: optimizer step, data loading, logging"})
        args: dict[str, Any] = {"step": timeline.step, "makespan_s": timeline.makespan, "tasks": len(timeline.tasks)}
        if timeline.peak_activation_bytes is not None:
            args["peak_activation_bytes"] = list(timeline.peak_activation_bytes)
        events += _span(f"{label} ({seconds(timeline.makespan)})", "step", first, last, origin, args)
        for name, at in ((f"{label} begins", first), (f"{label} ends", last)):
            events.append({"name": name, "cat": "step", "ph": "i", "s": "g", "ts": (at - origin) * 1e6,
                           "pid": 0, "tid": STEP_TRACK})
        previous_end = last if previous_end is None else max(previous_end, last)
        events += _task_events(timeline, origin)
    trace = {"traceEvents": events, "displayTimeUnit": "ms"}
    if path is not None:
        Path(path).write_text(json.dumps(trace), encoding="utf-8")
    return trace


def _span(name: str, category: str, start: float, end: float, origin: float, args: dict[str, Any]) -> list[dict[str, Any]]:
    """A slice on the steps track as a begin/end pair, so the complete events stay exactly the tasks."""
    common = {"name": name, "cat": category, "pid": 0, "tid": STEP_TRACK}
    return [{**common, "ph": "B", "ts": (start - origin) * 1e6, "args": args},
            {**common, "ph": "E", "ts": (end - origin) * 1e6}]


def _task_events(timeline: Drawable, origin: float) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
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
    return events


def gantt_png(timeline: Drawable, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Draw :func:`gantt_figure` and save it as a PNG at ``path``."""
    figure = gantt_figure(timeline, title=title)
    path = Path(path)
    figure.savefig(path, format="png", dpi=GANTT_DPI)
    return path


def gantt_figure(timeline: Drawable, *, title: str | None = None) -> Any:
    """A matplotlib ``Figure``: one row per rank, one bar per task.

    Colour says the kind (F blue, B orange, W green); on a rank that runs
    several stages (interleaved and V schedules), each of its stages gets its
    own shade, darkest for its first stage, and the legend says which stages
    each shade is. Bar labels fit the bar: ``F1.3`` where there is room, the
    micro-batch alone (``3``) on a narrower bar, nothing on a sliver (the
    Chrome trace has every name). Needs matplotlib (``pip install
    pipesched[plot]``); imported here so the library does not depend on it.
    Uses the object API, not pyplot, so it neither opens windows nor changes
    the caller's matplotlib backend.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as error:
        raise ImportError(_MISSING_MATPLOTLIB) from error

    origin, span = timeline.tasks[0].start, timeline.makespan
    scale, unit = (1e3, "ms") if span < 1.0 else (1.0, "s")
    shades = stage_shades(timeline.tasks)
    inches = max(6.0, min(16.0, 4.0 + 0.45 * len(timeline.tasks) / timeline.num_ranks))
    figure = Figure(figsize=(inches, 1.4 + 0.5 * timeline.num_ranks), dpi=GANTT_DPI)
    axes = figure.add_subplot()
    plot_px = 0.75 * inches * GANTT_DPI  # roughly the axes' width
    for t in timeline.tasks:
        left, width = (t.start - origin) * scale, (t.end - t.start) * scale
        color = shade(COLORS[t.kind], shades[t.stage])
        axes.barh(t.rank, width, left=left, height=0.8, color=color, edgecolor="white", linewidth=0.5)
        label = bar_label(t, (t.end - t.start) / span * plot_px if span > 0 else 0.0)
        if label:
            axes.text(left + width / 2, t.rank, label, ha="center", va="center", fontsize=LABEL_POINTS,
                      color=text_color(color))
    axes.set_yticks(range(timeline.num_ranks), [f"rank {r}" for r in range(timeline.num_ranks)])
    axes.set_ylim(timeline.num_ranks - 0.5, -0.5)  # rank 0 on top
    axes.set_xlabel(unit)
    split = any(t.kind == "W" for t in timeline.tasks)
    labels = {"F": "forward", "B": "backward (input grad)" if split else "backward", "W": "weight grad"}
    handles = [Patch(color=COLORS[k], label=labels[k]) for k in ("FBW" if split else "FB")]
    levels = sorted(set(shades.values()))
    if len(levels) > 1:  # some rank runs several stages: say which shade is which
        for level in levels:
            stages = ", ".join(str(s) for s in sorted(shades) if shades[s] == level)
            handles.append(Patch(color=shade("#707070", level), label=f"stages {stages}"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    axes.set_title(title or f"{timeline.schedule or 'pipeline'}: makespan {seconds(span)}")
    figure.text(0.01, 0.01, "labels: F1.3 = forward of stage 1, micro-batch 3; a narrow bar shows its "
                "micro-batch only; the Chrome trace names every task", fontsize=6, color="#555555")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return figure


#: Gantt chart resolution, and the size of the text on its bars.
GANTT_DPI = 120
LABEL_POINTS = 7


def stage_shades(tasks: Sequence[TaskRecord]) -> dict[int, float]:
    """How much each stage's bars are lightened (0: the kind's colour; up to 0.6).

    A rank's stages in order get 0, then lighter steps, so two stages on one
    rank never look alike; a rank with one stage keeps the plain colour.
    """
    per_rank: dict[int, set[int]] = {}
    for t in tasks:
        per_rank.setdefault(t.rank, set()).add(t.stage)
    shades = {}
    for stages in per_rank.values():
        ordered = sorted(stages)
        for index, stage in enumerate(ordered):
            shades[stage] = 0.6 * index / len(ordered) if len(ordered) > 1 else 0.0
    return shades


def shade(color: str, amount: float) -> str:
    """``color`` (``#rrggbb``) mixed with white: ``amount`` 0 keeps it, 1 is white."""
    channels = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in channels)


def text_color(color: str) -> str:
    """White on a dark bar, near-black on a light one (relative luminance of ``#rrggbb``)."""
    r, g, b = (int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.6 else "#222222"


def bar_label(task: TaskRecord, width_px: float) -> str:
    """The longest label that fits a bar ``width_px`` wide: ``F1.3``, else ``3``, else nothing."""
    char_px = 0.6 * LABEL_POINTS * GANTT_DPI / 72  # an average glyph of the label font
    for label in (f"{task.kind}{task.stage}.{task.microbatch}", str(task.microbatch)):
        if width_px >= char_px * len(label) + 4.0:
            return label
    return ""
