"""What :meth:`pipesched.Timeline.analyze` answers about one step: busy and idle time per rank,
the runtime's and the schedule's efficiency, memory peaks, and a what-if prediction.

A plain frozen record with a text table (:meth:`TimelineAnalysis.format_table`)
and a dict view (:meth:`TimelineAnalysis.as_dict`); :mod:`pipesched.observe.timeline`
computes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipesched.observe.units import nbytes, percent, seconds


@dataclass(frozen=True)
class TimelineAnalysis:
    """Where one step's time went. Seconds, and fractions in 0..1 (the table prints %).

    * ``measured_makespan``: first task start to last task end.
    * ``busy_seconds``, ``busy_fraction``, ``idle_fraction``: per rank, against the
      measured makespan. ``bubble_over_total`` (idle / (ranks × makespan)) and
      ``bubble_over_ideal`` (idle / busy) are the measured bubble overall, in the
      two conventions of :class:`pipesched.plan.simulate.SimResult`.
    * ``replay_makespan``: the plan replayed on the measured durations with no
      overhead; ``runtime_efficiency = replay_makespan / measured_makespan``. It is
      at most 1.0 when every task's recorded start follows its inputs' recorded
      ends; it can exceed 1.0 by as much as a recorded end trails the moment
      the output was handed over (the replay waits for the recorded end).
    * ``lower_bound``: max(busiest rank's work, longest micro-batch chain);
      ``schedule_efficiency = lower_bound / replay_makespan``.
      These four are ``None`` when the tasks are not a self-contained plan (e.g.
      the backward-only half of ``pipe(x)`` then ``output.backward()``).
    * ``replayed``: ``"recorded order"``: the figures above are about the run that was measured.
    * ``what_if``, ``predicted_makespan``, ``predicted_speedup``: set when ``analyze(schedule=...)``
      asked for another schedule's plan, replayed on the same measured task times:
      a prediction, not a measurement. ``predicted_speedup = replay_makespan /
      predicted_makespan`` compares two replays (both without overhead), so
      above 1.0 means that schedule would be faster with these task times.
    * ``stage_work``: seconds of F + B (+ W, where backwards were split) per stage;
      ``stage_balance = mean / max`` of it (1.0: perfectly balanced; 0.5: the
      slowest stage does twice the average).
    * ``peak_inflight``: per rank, most micro-batches forwarded and not yet
      backwarded at once (for a split backward: not yet through its W),
      counted from the records.
    * ``peak_activation_bytes``: per rank, from the step report, or from the
      step's ``"memory"`` log events; ``None`` for a log that lacks them.
    """

    schedule: str | None
    num_ranks: int
    num_stages: int
    num_microbatches: int
    num_tasks: int
    measured_makespan: float
    busy_seconds: list[float]
    busy_fraction: list[float]
    idle_fraction: list[float]
    bubble_over_total: float
    bubble_over_ideal: float
    replayed: str
    replay_makespan: float | None
    lower_bound: float | None
    runtime_efficiency: float | None
    schedule_efficiency: float | None
    stage_work: list[float]
    stage_balance: float
    peak_inflight: list[int]
    peak_activation_bytes: list[int] | None
    what_if: str | None = None
    predicted_makespan: float | None = None
    predicted_speedup: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (lists, numbers, strings, ``None``)."""
        return asdict(self)

    def format_table(self) -> str:
        """A readable summary: one header block, then one row per rank."""
        header = [
            f"schedule {self.schedule or '?'}: {self.num_stages} stages on {self.num_ranks} ranks, "
            f"{self.num_microbatches} micro-batches, {self.num_tasks} tasks",
            f"measured makespan     {seconds(self.measured_makespan)}",
            f"replay makespan       {seconds(self.replay_makespan)}  ({self.replayed}, measured task times, "
            f"no overhead)",
            f"runtime efficiency    {percent(self.runtime_efficiency)}  (replay / measured)",
            f"lower bound           {seconds(self.lower_bound)}  (max of busiest rank, longest chain)",
            f"schedule efficiency   {percent(self.schedule_efficiency)}  (lower bound / replay)",
            f"bubble                {percent(self.bubble_over_total)} of total, "
            f"{percent(self.bubble_over_ideal)} of ideal  (idle / (ranks x makespan), idle / busy)",
            f"stage balance         {percent(self.stage_balance)}  (mean / max stage work)",
        ]
        if self.what_if is not None:
            header += [
                f"what-if {self.what_if:13s} {seconds(self.predicted_makespan)}  PREDICTED: the {self.what_if} plan "
                f"replayed on these task times, not measured",
                f"predicted speed-up    {_times(self.predicted_speedup)}  (recorded-order replay / {self.what_if} "
                f"replay; > 1: {self.what_if} would be faster)",
            ]
        columns = ["rank", "busy", "busy %", "idle %", "peak in-flight", "peak activations"]
        rows = [
            [
                str(rank),
                seconds(self.busy_seconds[rank]),
                percent(self.busy_fraction[rank]),
                percent(self.idle_fraction[rank]),
                str(self.peak_inflight[rank]),
                nbytes(self.peak_activation_bytes[rank] if self.peak_activation_bytes else None),
            ]
            for rank in range(self.num_ranks)
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
        return "\n".join(header + [""] + lines)


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"
