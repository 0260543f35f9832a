"""Read a step's task timeline and say where the time went.

Every task the engine runs becomes one record (rank, stage, micro-batch, kind,
start, end on one monotonic clock): in ``pipe.last_report``, and, when structlog
is configured, as one ``"task"`` log event. A :class:`Timeline` holds one
step's records, from any of those sources::

    Timeline.from_report(pipe.last_report)
    Timeline.from_events(captured_event_dicts)          # structlog.testing.capture_logs()
    Timeline.from_jsonl("run.jsonl", step=None)         # structlog JSONRenderer output

and answers three questions (:meth:`Timeline.analyze`):

* **How busy was each rank?** busy and idle share of the measured makespan.
* **What did the runtime add?** The same plan replayed by the simulator on the
  measured task durations is what a zero-overhead runtime would take, so
  ``runtime_efficiency = replay / measured`` isolates orchestration overhead
  (thread wake-ups, transfers, Python) from the schedule itself.
* **What did the schedule leave on the table?**
  ``schedule_efficiency = lower_bound / replay``, where the lower bound is the
  larger of the busiest rank's work and the longest micro-batch chain: the
  bubble the schedule's order causes, with runtime noise taken out.

It also exports a Chrome/Perfetto trace (open it at ui.perfetto.dev) and a
Gantt chart PNG (needs matplotlib: ``pip install pipesched[plot]``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipesched.plan.action import Action, Plan
from pipesched.observe.report import CommRecord, StepReport, TaskRecord
from pipesched.plan.schedule import Schedule
from pipesched.plan.simulate import IncompletePlan, lower_bound, peak_inflight, simulate
from pipesched.observe.logread import LoggedStep, logged_steps, pick_step
from pipesched.observe.tasklog import configure_jsonl_logging, read_jsonl
from pipesched.observe.export import chrome_trace, gantt_png
from pipesched.observe.analysis import TimelineAnalysis

__all__ = ["Timeline", "TimelineAnalysis", "configure_jsonl_logging"]



class Timeline:
    """One step's task records, with analysis and exports.

    Build it with :meth:`from_report`, :meth:`from_events` or :meth:`from_jsonl`,
    or directly from task records (``Timeline(sim.records())`` shows a simulated
    run). The shape (``num_ranks``, ``num_stages``, ``num_microbatches``) defaults
    to what the records show.
    """

    def __init__(
        self,
        tasks: Iterable[TaskRecord],
        *,
        num_ranks: int | None = None,
        num_stages: int | None = None,
        num_microbatches: int | None = None,
        schedule: str | None = None,
        peak_activation_bytes: Sequence[int] | None = None,
        step: int | None = None,
        comm: Iterable[CommRecord] = (),
    ):
        records = list(tasks)
        if not records:
            raise ValueError(
                "a Timeline needs at least one task record; run a step first (and configure "
                "structlog before it when reading logs)"
            )
        for record in records:
            if not isinstance(record, TaskRecord):
                raise ValueError(f"tasks must be pipesched.TaskRecord values, got {type(record).__name__}")
        records.sort(key=lambda t: (t.start, t.rank, t.end))
        seen: dict[Action, TaskRecord] = {}
        for record in records:
            if record.end < record.start:
                raise ValueError(f"task {record} ends before it starts")
            action = Action(record.kind, record.stage, record.microbatch)  # type: ignore[arg-type]
            if action in seen:
                raise ValueError(
                    f"{action} appears twice in the tasks (ranks {seen[action].rank} and {record.rank}); "
                    f"a Timeline holds one step: select one with step=..."
                )
            seen[action] = record
        self.tasks: list[TaskRecord] = records
        self.num_ranks = _at_least("num_ranks", num_ranks, 1 + max(t.rank for t in records))
        self.num_stages = _at_least("num_stages", num_stages, 1 + max(t.stage for t in records))
        self.num_microbatches = _at_least(
            "num_microbatches", num_microbatches, 1 + max(t.microbatch for t in records)
        )
        if peak_activation_bytes is not None and len(peak_activation_bytes) != self.num_ranks:
            raise ValueError(
                f"peak_activation_bytes must give one value per rank ({self.num_ranks}), "
                f"got {len(peak_activation_bytes)}"
            )
        self.schedule = schedule
        self.peak_activation_bytes = None if peak_activation_bytes is None else list(peak_activation_bytes)
        self.step = step
        #: Transfers between processes (multi-process pipelines), on the same clock.
        self.comm: list[CommRecord] = sorted(comm, key=lambda c: (c.start, c.rank))

    # ----------------------------------------------------------------- sources

    @classmethod
    def from_report(cls, report: StepReport | None) -> Timeline:
        """The timeline of ``pipe.last_report`` (carries peak activation bytes too)."""
        if report is None:
            raise ValueError("report is None: run pipe.step(...) or pipe(inputs) before reading pipe.last_report")
        if not isinstance(report, StepReport):
            raise ValueError(f"report must be a pipesched.StepReport, got {type(report).__name__}")
        return cls(
            report.tasks,
            num_ranks=report.num_ranks,
            num_stages=report.num_stages,
            num_microbatches=report.num_microbatches,
            schedule=report.schedule,
            peak_activation_bytes=report.peak_activation_bytes or None,
        )

    @classmethod
    def from_events(cls, events: Iterable[Mapping[str, Any]], step: int | None = None) -> Timeline:
        """The timeline of one step from structlog event dicts.

        Events whose ``"event"`` is not ``"task"``, ``"comm"`` or ``"memory"``
        are ignored. The engine logs a step's events together, tagged with
        ``"step"``; ``step=None`` takes the last step logged, ``step=k`` the
        last run of events tagged ``k``. The step's ``"memory"`` events give
        the peak activation bytes the live report showed.
        """
        return cls._from_logged(pick_step(logged_steps(events), step))

    @classmethod
    def steps_from_events(cls, events: Iterable[Mapping[str, Any]]) -> list[Timeline]:
        """Every logged step, in log order, one timeline each (see :meth:`from_events`)."""
        return [cls._from_logged(run) for run in logged_steps(events)]

    @classmethod
    def from_jsonl(
        cls, path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], step: int | None = None
    ) -> Timeline:
        """The timeline of one step from JSON-lines logs (see :func:`configure_jsonl_logging`).

        ``path`` is one log, or several: one per process of a multi-process
        pipeline, merged into one timeline (their times are already on rank
        0's clock). Blank lines and lines whose event is not one of the
        engine's are skipped; a line that is not JSON is an error naming
        it. ``step`` as in :meth:`from_events`, applied to each log.
        """
        if isinstance(path, (str, os.PathLike)):
            return cls.from_events(read_jsonl(path), step=step)
        parts = [pick_step(logged_steps(read_jsonl(p)), step) for p in path]
        if not parts:
            raise ValueError("from_jsonl needs at least one log path")
        steps = {part.step for part in parts}
        if len(steps) > 1:
            raise ValueError(
                f"the logs end at different steps ({sorted(map(str, steps))}); pass step=... to pick one"
            )
        return cls._from_logged(_merged(parts))

    @classmethod
    def steps_from_jsonl(cls, path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Timeline]:
        """Every logged step of one log, or of several per-process logs merged step by step.

        With several logs, a step is kept when every log holds it (matched by
        step tag, the last run of each tag), in the first log's order.
        """
        if isinstance(path, (str, os.PathLike)):
            return cls.steps_from_events(read_jsonl(path))
        logs = [logged_steps(read_jsonl(p)) for p in path]
        if not logs:
            raise ValueError("steps_from_jsonl needs at least one log path")
        by_tag = [{run.tag: run for run in runs} for runs in logs]
        tags = [tag for tag in dict.fromkeys(run.tag for run in logs[0]) if all(tag in other for other in by_tag)]
        if not tags:
            raise ValueError("the logs share no step; pass them one at a time")
        return [cls._from_logged(_merged([other[tag] for other in by_tag])) for tag in tags]

    @classmethod
    def _from_logged(cls, run: LoggedStep) -> Timeline:
        num_ranks = 1 + max(t.rank for t in run.tasks)
        return cls(
            run.tasks, step=run.step, schedule=run.schedule, comm=run.comm,
            peak_activation_bytes=run.peak_activation_bytes(num_ranks),
        )

    # ---------------------------------------------------------------- analysis

    @property
    def makespan(self) -> float:
        """Measured seconds from the first task's start to the last task's end."""
        return max(t.end for t in self.tasks) - self.tasks[0].start

    def busy(self) -> list[float]:
        """Seconds each rank spent in tasks."""
        totals: list[list[float]] = [[] for _ in range(self.num_ranks)]
        for t in self.tasks:
            totals[t.rank].append(t.end - t.start)
        return [math.fsum(v) for v in totals]

    def plan(self) -> Plan:
        """Each rank's actions in the order it ran them (a rank runs one at a time)."""
        plan: Plan = [[] for _ in range(self.num_ranks)]
        for t in self.tasks:  # sorted by start
            plan[t.rank].append(Action(t.kind, t.stage, t.microbatch))  # type: ignore[arg-type]
        return plan

    def analyze(self, schedule: str | Schedule | None = None) -> TimelineAnalysis:
        """Where the time went; see :class:`TimelineAnalysis` for every figure.

        ``schedule`` (a name or a :class:`~pipesched.Schedule`) adds a what-if:
        that schedule's plan for the same shape, replayed on these task times
        ("how long would 1F1B take?"). Its makespan is a *prediction*
        (``predicted_makespan``, ``predicted_speedup``), kept apart from the
        figures of the run that was measured, which stay those of the recorded order.
        """
        measured = self.makespan
        busy = self.busy()
        idle = [max(0.0, measured - b) for b in busy]
        plan, replayed = self._plan_for(None)
        replay_makespan, bound = self._replay(plan)
        what_if = predicted = None
        if schedule is not None:
            other, what_if = self._plan_for(schedule)
            predicted, _ = self._replay(other)
        stage_work = [0.0] * self.num_stages
        for t in self.tasks:
            stage_work[t.stage] += t.end - t.start
        heaviest = max(stage_work)
        return TimelineAnalysis(
            schedule=self.schedule,
            num_ranks=self.num_ranks,
            num_stages=self.num_stages,
            num_microbatches=self.num_microbatches,
            num_tasks=len(self.tasks),
            measured_makespan=measured,
            busy_seconds=busy,
            busy_fraction=[_share(b, measured) for b in busy],
            idle_fraction=[_share(i, measured) for i in idle],
            bubble_over_total=_share(math.fsum(idle), measured * self.num_ranks),
            bubble_over_ideal=_share(math.fsum(idle), math.fsum(busy)),
            replayed=replayed,
            replay_makespan=replay_makespan,
            lower_bound=bound,
            runtime_efficiency=None if replay_makespan is None else _share(replay_makespan, measured, 1.0),
            schedule_efficiency=None if bound is None else _share(bound, replay_makespan or 0.0, 1.0),
            stage_work=stage_work,
            stage_balance=_share(math.fsum(stage_work) / self.num_stages, heaviest, 1.0),
            peak_inflight=[peak_inflight(row) for row in self.plan()],
            peak_activation_bytes=self.peak_activation_bytes,
            what_if=what_if,
            predicted_makespan=predicted,
            predicted_speedup=None if predicted is None or replay_makespan is None
            else _share(replay_makespan, predicted, 1.0),
        )

    def _replay(self, plan: Plan) -> tuple[float | None, float | None]:
        """The plan's makespan and lower bound on the measured task times; ``None`` for a partial plan."""
        try:
            sim = simulate(plan, self.tasks, num_stages=self.num_stages)
            return sim.makespan, lower_bound(plan, self.tasks, num_stages=self.num_stages).value
        except IncompletePlan:
            return None, None

    def _plan_for(self, schedule: str | Schedule | None) -> tuple[Plan, str]:
        recorded = self.plan()
        if schedule is None:
            return recorded, "recorded order"
        if isinstance(schedule, str):
            from pipesched.plan.registry import get_schedule

            schedule = get_schedule(schedule)
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a name or a pipesched.Schedule, got {type(schedule).__name__}")
        plan = [list(row) for row in schedule.plan(self.num_stages, self.num_microbatches, self.num_ranks)]
        wanted = {a for row in plan for a in row}
        have = {a for row in recorded for a in row}
        if wanted != have:
            differ = sorted(map(str, wanted ^ have))
            raise ValueError(
                f"schedule {schedule.name!r} and this timeline hold different actions "
                f"({', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''} in only one of them); "
                f"a what-if replay needs the same stages, micro-batches and kinds"
            )
        return plan, schedule.name

    # ----------------------------------------------------------------- exports

    def to_chrome_trace(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Chrome/Perfetto trace: one complete event per task, a track per rank (and its comm).

        Written to ``path`` as JSON when given; returned either way. See
        :func:`pipesched.observe.export.chrome_trace`.
        """
        return chrome_trace(self, path)

    def to_gantt_png(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """A Gantt chart PNG, one row per rank (needs matplotlib: ``pipesched[plot]``).

        See :func:`pipesched.observe.export.gantt_png`.
        """
        return gantt_png(self, path, title=title)


def _merged(parts: Sequence[LoggedStep]) -> LoggedStep:
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    return merged


def _at_least(name: str, given: int | None, needed: int) -> int:
    if given is None:
        return needed
    if isinstance(given, bool) or not isinstance(given, int) or given < needed:
        raise ValueError(f"{name} must be an int >= {needed} (what the tasks use), got {given!r}; or leave it out")
    return given


def _share(part: float, whole: float, empty: float = 0.0) -> float:
    return part / whole if whole > 0.0 else empty
