"""1. Orchestration efficiency on a calibrated workload.

Every stage sleeps (releasing the GIL) for a known time: forward ``t``,
backward ``2t``. The simulator replays the schedule's plan with what those
stages really take here (calibrated: the median of many forward and backward
calls of one stage, timed alone outside any pipeline, which is the sleep plus
the stage's own autograd call that any runner pays), which is the makespan of
a runtime with zero overhead. The figure is

    efficiency = replay makespan on calibrated costs ÷ measured step time

(the wall-clock of ``pipe.step``, everything included). Also reported:

* runtime efficiency: the plan replayed on the step's *measured* task records
  ÷ measured step time (what the timeline calls runtime efficiency, but
  against the whole step's wall clock);
* span efficiency: calibrated replay ÷ the report's makespan (first task start
  to last task end), which leaves out the per-step fixed cost (splitting,
  dispatch, collection, report);
* the same figure with only the sleeps calibrated (``time.sleep(t)`` alone),
  which also charges the stage's own autograd call to the engine;
* overhead per task in µs: (measured − calibrated replay) ÷ tasks per rank;
* fixed cost per step in ms: measured step time − makespan.

Fairness across schedules: every schedule runs the same total work per rank.
GPipe and 1F1B have one stage per rank (forward ``t``, backward ``2t``);
interleaved 1F1B has two stages per rank, each half the work (forward
``t/2``, backward ``t``), as when the same model is cut into twice as many
stages. So "10 ms tasks" means 10 ms forwards for GPipe/1F1B and 5 ms
forwards for interleaved, which runs twice as many tasks.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from torch import nn

from benchmarks.config import RunConfig
from benchmarks.sleep_stage import calibrate_sleep, calibrate_stage, sleep_model
from benchmarks.stats import fmt, summary
from benchmarks.table import format_table
from benchmarks.targets import Target
from pipesched import Pipeline, simulate

NAME = "orchestration"
TITLE = "1. Orchestration efficiency on a calibrated sleep workload (replay on calibrated stage costs / measured)"
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
#: (task ms, ranks, micro-batches, threshold) from the issue.
TARGETS = ((10.0, 4, 8, 0.98), (1.0, 8, 32, 0.93))


def _grid(cfg: RunConfig) -> list[tuple[float, int, int]]:
    targets = [(t, p, m) for t, p, m, _ in TARGETS]
    if cfg.level == "tiny":
        return [(1.0, 2, 4)]
    if cfg.level == "quick":
        return [(1.0, 2, 8), *targets]
    grid = [(1.0, p, m) for p in (2, 4, 8) for m in (4, 8, 16, 32, 64)]
    grid += [(10.0, p, 8) for p in (2, 4, 8)]
    return sorted(set(grid), key=lambda c: (-c[0], c[1], c[2]))


def _stages_per_rank(schedule: str) -> int:
    return 2 if schedule.startswith("interleaved") else 1


def run_config(
    schedule: str,
    task_ms: float,
    p: int,
    m: int,
    calibrated: dict[tuple[float, float], tuple[float, float]],
    sleeps: dict[float, float],
    steps: int,
) -> dict[str, Any]:
    v = _stages_per_rank(schedule)
    num_stages = v * p
    forward_s, backward_s = task_ms / 1e3 / v, 2 * task_ms / 1e3 / v
    model = sleep_model(num_stages, forward_s, backward_s)
    x, y = torch.zeros(m, 1), torch.zeros(m, 1)
    with Pipeline(
        model,
        schedule=schedule,
        balance=[1] * num_stages,
        devices=["cpu"] * p,
        chunks=m,
        checkpoint="never",
        loss_fn=nn.MSELoss(),
    ) as pipe:
        plan = pipe.schedule.plan(num_stages, m, p)
        cost_f, cost_b = calibrated[(forward_s, backward_s)]
        ideal = simulate(plan, lambda kind, stage: cost_f if kind == "F" else cost_b).makespan
        sleep_f, sleep_b = sleeps[forward_s], sleeps[backward_s]
        sleep_only = simulate(plan, lambda kind, stage: sleep_f if kind == "F" else sleep_b).makespan
        pipe.step(x, y)  # warm-up: threads, first-forward RNG probe
        walls, spans, replays = [], [], []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            pipe.step(x, y)
            walls.append(time.perf_counter() - start)
            report = pipe.last_report
            spans.append(report.makespan)
            replays.append(simulate(plan, report.tasks).makespan)
    tasks_per_rank = 2 * m * v
    return {
        "schedule": schedule,
        "task_ms": task_ms,
        "ranks": p,
        "microbatches": m,
        "stages": num_stages,
        "forward_s": forward_s,
        "backward_s": backward_s,
        "calibrated_forward_s": cost_f,
        "calibrated_backward_s": cost_b,
        "sleep_forward_s": sleep_f,
        "sleep_backward_s": sleep_b,
        "tasks_per_rank": tasks_per_rank,
        "replay_calibrated_s": ideal,
        "replay_sleep_only_s": sleep_only,
        "step_s": walls,
        "makespan_s": spans,
        "replay_measured_s": replays,
        "efficiency": summary([ideal / w for w in walls]),
        "efficiency_sleep_only": summary([sleep_only / w for w in walls]),
        "runtime_efficiency": summary([r / w for r, w in zip(replays, walls)]),
        "span_efficiency": summary([ideal / s for s in spans]),
        "overhead_us_per_task": summary([(w - ideal) / tasks_per_rank * 1e6 for w in walls]),
        # the overhead split: inside tasks (measured task durations beyond the calibrated
        # sleeps) and between them (hand-offs, waits the replay does not have)
        "in_task_us_per_task": summary([(r - ideal) / tasks_per_rank * 1e6 for r in replays]),
        "between_tasks_us_per_task": summary([(w - r) / tasks_per_rank * 1e6 for w, r in zip(walls, replays)]),
        "fixed_ms_per_step": summary([(w - s) * 1e3 for w, s in zip(walls, spans)]),
    }


def _engine_floor(cfg: RunConfig) -> list[dict[str, Any]]:
    """Step time per task with zero-length tasks: the engine's own cost, with a warm CPU."""
    configs = cfg.pick(tiny=[(2, 4)], quick=[(4, 8), (8, 32)], full=[(2, 8), (4, 8), (8, 32)])
    steps = cfg.n_rounds(tiny=1, quick=3, full=5)
    out = []
    for p, m in configs:
        for schedule in SCHEDULES:
            v = _stages_per_rank(schedule)
            model = sleep_model(v * p, 0.0, 0.0)
            x, y = torch.zeros(m, 1), torch.zeros(m, 1)
            with Pipeline(model, schedule=schedule, balance=[1] * (v * p), devices=["cpu"] * p, chunks=m,
                          checkpoint="never", loss_fn=nn.MSELoss()) as pipe:
                pipe.step(x, y)
                walls = []
                for _ in range(steps):
                    start = time.perf_counter()
                    pipe.step(x, y)
                    walls.append(time.perf_counter() - start)
            tasks = 2 * m * v
            out.append({"ranks": p, "microbatches": m, "schedule": schedule, "tasks_per_rank": tasks,
                        "step_ms": summary([w * 1e3 for w in walls]),
                        "us_per_task": summary([w / tasks * 1e6 for w in walls])})
    return out


def _switch_intervals(cfg: RunConfig) -> dict[str, Any]:
    """The target configurations (1F1B) at the default GIL switch interval and at each of ``cfg.switch_intervals``.

    A worker whose input arrives (or whose sleep ends) needs the GIL back; if
    another rank holds it running Python, CPython hands it over only when
    that rank blocks or after ``sys.getswitchinterval()`` (5 ms by default).
    Alternating rounds in one process, the interval set before each round's
    steps and restored at the end: per-round ratio of step times to the default's.
    """
    default = sys.getswitchinterval()
    intervals = [default, *[s for s in cfg.switch_intervals if s != default]]
    rounds = cfg.n_rounds(tiny=1, quick=5, full=7)
    out = []
    try:
        for task_ms, p, m, _ in TARGETS:
            model = sleep_model(p, task_ms / 1e3, 2 * task_ms / 1e3)
            x, y = torch.zeros(m, 1), torch.zeros(m, 1)
            with Pipeline(model, schedule="1f1b", balance=[1] * p, devices=["cpu"] * p, chunks=m,
                          checkpoint="never", loss_fn=nn.MSELoss()) as pipe:
                pipe.step(x, y)
                times: dict[float, list[float]] = {s: [] for s in intervals}
                for index in range(rounds):
                    order = intervals[index % len(intervals):] + intervals[:index % len(intervals)]
                    for interval in order:
                        sys.setswitchinterval(interval)
                        start = time.perf_counter()
                        for _ in range(2):
                            pipe.step(x, y)
                        times[interval].append((time.perf_counter() - start) / 2)
                        sys.setswitchinterval(default)
            for interval in intervals:
                out.append({
                    "task_ms": task_ms, "ranks": p, "microbatches": m, "switch_interval_s": interval,
                    "step_ms": summary([t * 1e3 for t in times[interval]]),
                    "vs_default": summary([t / d for t, d in zip(times[interval], times[default])]),
                })
    finally:
        sys.setswitchinterval(default)
    return {"default_s": default, "rounds": rounds, "rows": out}


def run(cfg: RunConfig) -> dict[str, Any]:
    grid = _grid(cfg)
    pairs = set()
    for task_ms, _, _ in grid:
        for schedule in SCHEDULES:
            v = _stages_per_rank(schedule)
            pairs.add((task_ms / 1e3 / v, 2 * task_ms / 1e3 / v))
    samples = cfg.pick(tiny=5, quick=20, full=40)
    calibration = calibrate_sleep({d for pair in pairs for d in pair}, samples=samples)
    sleeps = {d: float(s["median"]) for d, s in calibration.items()}
    stage_calibration = {pair: calibrate_stage(*pair, samples=samples) for pair in sorted(pairs)}
    calibrated = {pair: (float(c["F"]["median"]), float(c["B"]["median"])) for pair, c in stage_calibration.items()}
    cfg.log("calibration, requested ms -> median ms of time.sleep alone | of a whole stage call: " + ", ".join(
        f"F {f * 1e3:g}->{sleeps[f] * 1e3:.3f}|{calibrated[(f, b)][0] * 1e3:.3f} "
        f"B {b * 1e3:g}->{sleeps[b] * 1e3:.3f}|{calibrated[(f, b)][1] * 1e3:.3f}"
        for f, b in sorted(pairs)))
    base_steps = cfg.n_rounds(tiny=1, quick=2, full=3)
    target_steps = cfg.n_rounds(tiny=1, quick=3, full=5)
    target_keys = {(t, p, m) for t, p, m, _ in TARGETS}

    rows = []
    for task_ms, p, m in grid:
        steps = target_steps if (task_ms, p, m) in target_keys else base_steps
        done = [run_config(schedule, task_ms, p, m, calibrated, sleeps, steps) for schedule in SCHEDULES]
        rows += done
        cfg.log(f"{task_ms:g} ms p={p} m={m}: " + ", ".join(
            f"{r['schedule']} {float(r['efficiency']['median']):.3f}" for r in done))

    headers = ["task ms", "p", "m", "schedule", "tasks/rank", "replay ms", "step ms",
               "replay/measured", "sleep-only", "runtime eff", "span eff", "us/task", "in-task", "between",
               "fixed ms/step"]
    table_rows = [
        [
            f"{r['task_ms']:g}", r["ranks"], r["microbatches"], r["schedule"], r["tasks_per_rank"],
            f"{r['replay_calibrated_s'] * 1e3:.1f}", f"{summary(r['step_s'])['median'] * 1e3:.1f}",
            fmt(r["efficiency"]), f"{float(r['efficiency_sleep_only']['median']):.3f}",
            fmt(r["runtime_efficiency"]), fmt(r["span_efficiency"]),
            f"{r['overhead_us_per_task']['median']:.0f}", f"{r['in_task_us_per_task']['median']:.0f}",
            f"{r['between_tasks_us_per_task']['median']:.0f}", f"{r['fixed_ms_per_step']['median']:.2f}",
        ]
        for r in rows
    ]
    targets = []
    for task_ms, p, m, threshold in TARGETS:
        for r in rows:
            if (r["task_ms"], r["ranks"], r["microbatches"]) == (task_ms, p, m):
                targets.append(Target(
                    f"{r['schedule']} replay/measured at {task_ms:g} ms tasks (p={p}, m={m})",
                    float(r["efficiency"]["median"]), threshold,
                    note=f"{r['overhead_us_per_task']['median']:.0f} us/task",
                ))
    table = format_table(headers, table_rows, title=TITLE)
    notes = (
        "replay/measured: simulator replay on calibrated stage costs (one stage's forward / backward timed alone) "
        "/ wall-clock of pipe.step (median [min..max] over steps).\nsleep-only: the same with time.sleep alone "
        "calibrated (charges the stage's own autograd call to the engine).\nruntime eff: replay on the step's measured task records / "
        "wall-clock. span eff: calibrated replay / first-start-to-last-end makespan.\n"
        "us/task = (measured - calibrated replay) / tasks per rank = in-task (replay on measured - replay on "
        "calibrated) + between (measured - replay on measured).\nInterleaved: 2 stages per rank, each half the "
        "work (same work per rank)."
    )
    floor = _engine_floor(cfg)
    notes += "\n\n" + format_table(
        ["p", "m", "schedule", "tasks/rank", "step ms", "us per task (step / tasks per rank)"],
        [[f["ranks"], f["microbatches"], f["schedule"], f["tasks_per_rank"], fmt(f["step_ms"], 2),
          fmt(f["us_per_task"], 0)] for f in floor],
        title="engine floor: the same pipelines with empty tasks (no sleep), step time per task",
    )
    switch = _switch_intervals(cfg) if cfg.switch_intervals else None
    if switch is not None:
        notes += "\n\n" + format_table(
            ["task ms", "p", "m", "switch interval ms", "step ms", "step / default's"],
            [[f"{r['task_ms']:g}", r["ranks"], r["microbatches"], f"{r['switch_interval_s'] * 1e3:g}",
              fmt(r["step_ms"], 1), fmt(r["vs_default"])] for r in switch["rows"]],
            title=f"GIL switch interval (1F1B, sys.setswitchinterval per round, {switch['rounds']} alternating rounds; "
                  f"the library leaves it at the process's {switch['default_s'] * 1e3:g} ms)",
        )
    return {
        "title": TITLE,
        "table": table + "\n" + notes,
        "switch_interval": switch,
        "targets": targets,
        "calibration": {str(k): v for k, v in calibration.items()},
        "stage_calibration": {f"{f}/{b}": v for (f, b), v in stage_calibration.items()},
        "engine_floor": floor,
        "rows": rows,
    }
