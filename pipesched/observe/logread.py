"""Structlog events back into steps: which events belong to which logged step.

The engine logs each step's events together, after the step, each tagged with
``"step"`` (the pipeline's step counter) and ``"schedule"``:

* ``"task"``: one per executed action (rank, stage, micro-batch, kind, start, end);
* ``"comm"``: one per transfer (multi-process pipelines);
* ``"memory"``: one per rank this process ran: ``peak_activation_bytes`` and
  ``peak_inflight`` of the step, the figures of ``pipe.last_report``, so a
  timeline read from a log shows what the live report showed.

A *run* is a stretch of consecutive events with the same step tag: one step of
one pipeline. (Several pipelines appending to one file restart their counters;
runs keep their steps apart anyway, in file order.) Events with another
``"event"`` (the application's own) are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipesched.observe.report import CommRecord
from pipesched.plan.record import TaskRecord

#: The events a run is made of.
STEP_EVENTS = ("task", "comm", "memory")

NO_TASK_EVENTS = (
    "no task events found: configure structlog before pipe.step() "
    "(pipesched.observe.timeline.configure_jsonl_logging does it in one call)"
)


@dataclass
class LoggedStep:
    """One run of a log: a step's task, comm and memory events, parsed."""

    tag: Any
    tasks: list[TaskRecord] = field(default_factory=list)
    comm: list[CommRecord] = field(default_factory=list)
    schedule: str | None = None
    #: rank -> (peak activation bytes, peak in-flight), from ``"memory"`` events.
    memory: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        return self.tag if isinstance(self.tag, int) and not isinstance(self.tag, bool) else None

    def peak_activation_bytes(self, num_ranks: int) -> list[int] | None:
        """Per rank, when every rank's ``"memory"`` event is present; else ``None`` (e.g. an older log)."""
        if any(rank not in self.memory for rank in range(num_ranks)):
            return None
        return [self.memory[rank][0] for rank in range(num_ranks)]

    def merge(self, other: LoggedStep) -> LoggedStep:
        """This step as another process logged it too (multi-process pipelines: one log per rank)."""
        return LoggedStep(
            self.tag, self.tasks + other.tasks, self.comm + other.comm,
            self.schedule or other.schedule, {**self.memory, **other.memory},
        )


def logged_steps(events: Iterable[Mapping[str, Any]]) -> list[LoggedStep]:
    """Every run of step events, in log order; raises ``ValueError`` when there is no task at all."""
    runs: list[LoggedStep] = []
    for event in events:
        if not isinstance(event, Mapping) or event.get("event") not in STEP_EVENTS:
            continue
        tag = event.get("step")
        if not runs or runs[-1].tag != tag:
            runs.append(LoggedStep(tag))
        run = runs[-1]
        kind = event["event"]
        if kind == "task":
            run.tasks.append(_task(event))
        elif kind == "comm":
            run.comm.append(_comm(event))
        else:
            run.memory[int(event["rank"])] = (int(event["peak_activation_bytes"]), int(event.get("peak_inflight", 0)))
        if run.schedule is None and event.get("schedule"):
            run.schedule = str(event["schedule"])
    runs = [run for run in runs if run.tasks]
    if not runs:
        raise ValueError(NO_TASK_EVENTS)
    return runs


def pick_step(runs: Sequence[LoggedStep], step: int | None) -> LoggedStep:
    """``step=None``: the last run; ``step=k``: the last run tagged ``k`` (an error lists the tags)."""
    if step is None:
        return runs[-1]
    matching = [run for run in runs if run.tag == step]
    if not matching:
        present = ", ".join(str(t) for t in dict.fromkeys(run.tag for run in runs))
        raise ValueError(f"step={step!r} is not among the logged steps ({present}); pick one of those")
    return matching[-1]


def _comm(event: Mapping[str, Any]) -> CommRecord:
    return CommRecord(
        int(event["rank"]), int(event["peer"]), str(event["kind"]), str(event["action"]),
        float(event["start"]), float(event["end"]), int(event.get("bytes", 0)),
    )


def _task(event: Mapping[str, Any]) -> TaskRecord:
    missing = [k for k in ("rank", "stage", "microbatch", "kind", "start", "end") if k not in event]
    if missing:
        raise ValueError(f"task event {dict(event)!r} lacks {', '.join(missing)}; was it written by pipesched?")
    return TaskRecord(
        int(event["rank"]), int(event["stage"]), int(event["microbatch"]), str(event["kind"]),
        float(event["start"]), float(event["end"]),
    )
