"""16. Planning at the scale of real clusters: plan, validate and simulate against the number of tasks; ``auto``.

``auto`` and ``tune`` run the simulator many times, and real clusters
pipeline over 16-128 ranks with hundreds to thousands of micro-batches. For
1F1B at growing (p ranks, m micro-batches), i.e. ``2pm`` tasks, this times
the three steps a plan goes through before it runs:

* ``plan``: ``get_schedule("1f1b").plan(p, m, p)`` (the Action objects);
* ``validate``: :func:`pipesched.plan.schedule.validate_plan` (every check and
  the deadlock check), on the array path it uses by default;
* ``simulate``: :func:`pipesched.simulate` of the validated plan, F = 1, B = 2.

Side by side at one size the reference (dict-based) validator and simulator,
``validate_actions_reference`` and ``simulate_reference``, run on the same
plan: the ratio is how much the array path saves, and the makespans must be
equal (the unit tests hold every start and end equal on many small plans).
Other schedules (ZB-H1, interleaved 1F1B, ZB-V, DualPipeV) are timed at one
size, and ``auto`` plans p = 32, m = 256 for costs with a heavy last stage.

Each step runs once and is timed in CPU seconds of this process: the work
is single-threaded, so on a quiet machine that is its wall time, and on a
shared one (this project's, where eight jobs may run on two cores) it is
the figure other processes do not inflate; the wall time is given beside
it. The per-task microseconds show whether the cost grows linearly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.config import RunConfig
from benchmarks.table import format_table
from benchmarks.targets import Target
from pipesched import get_schedule, simulate
from pipesched.plan.schedule import validate_actions_reference, validate_plan
from pipesched.plan.simulate import simulate_reference

NAME = "plan_scale"
TITLE = "16. Planning at cluster scale: plan + validate + simulate seconds vs tasks, and auto at p=32 m=256"
#: (schedule, options, stages per rank) timed at one size besides the 1F1B curve
OTHERS = (("zb-h1", {}, 1), ("interleaved-1f1b", {"virtual_stages": 2}, 2), ("zb-v", {}, 2), ("dualpipe-v", {}, 2))


#: CPU seconds of this process per timed call, by label (single-threaded work: on a quiet machine the
#: wall time; on a shared one the figure other processes do not inflate)
CPU: dict[str, float] = {}


def timed(work: Callable[[], Any], label: str = "") -> tuple[Any, float]:
    began, cpu = time.perf_counter(), time.process_time()
    value = work()
    if label:
        CPU[label] = time.process_time() - cpu
    return value, time.perf_counter() - began


def costs_for(stages: int, heavy_last: bool = False) -> dict[tuple[str, int], float]:
    costs = {(kind, s): {"F": 1.0, "B": 2.0, "W": 1.0}[kind] for kind in "FBW" for s in range(stages)}
    if heavy_last:
        costs[("F", stages - 1)] = 3.0  # a language model's head and loss
    return costs


def scale_row(name: str, options: dict[str, Any], v: int, p: int, m: int, reference: bool) -> dict[str, Any]:
    stages = v * p
    schedule = get_schedule(name, **options)
    placement = schedule.placement(stages, p)
    raw, plan_s = timed(lambda: schedule.plan(stages, m, p), "plan")
    plan, validate_s = timed(lambda: validate_plan(raw, stages, m, p, placement), "validate")
    costs = costs_for(stages)
    sim, simulate_s = timed(lambda: simulate(plan, costs), "simulate")
    tasks = sum(len(row) for row in plan)
    cpu = CPU["plan"] + CPU["validate"] + CPU["simulate"]
    row: dict[str, Any] = {
        "schedule": name, "p": p, "m": m, "tasks": tasks, "plan_s": plan_s, "validate_s": validate_s,
        "simulate_s": simulate_s, "total_s": plan_s + validate_s + simulate_s,
        "plan_cpu_s": CPU["plan"], "validate_cpu_s": CPU["validate"], "simulate_cpu_s": CPU["simulate"],
        "total_cpu_s": cpu, "us_per_task": cpu / tasks * 1e6, "makespan": sim.makespan,
    }
    if reference:
        _, row["reference_validate_s"] = timed(lambda: validate_actions_reference(raw, stages, m, placement, "FBW", ()),
                                               "reference validate")
        slow, row["reference_simulate_s"] = timed(lambda: simulate_reference(raw, costs), "reference simulate")
        row["reference_validate_cpu_s"] = CPU["reference validate"]
        row["reference_simulate_cpu_s"] = CPU["reference simulate"]
        row["same_makespan"] = slow.makespan == sim.makespan
        row["same_times"] = dict(slow.end) == dict(sim.end) and dict(slow.start) == dict(sim.start)
    return row


def auto_row(placement: str, p: int, m: int) -> dict[str, Any]:
    stages = {"contiguous": 1, "v": 2}[placement] * p
    schedule = get_schedule("auto", costs=costs_for(stages, heavy_last=True), placement=placement)
    _, seconds = timed(lambda: schedule.plan(stages, m, p), "auto")
    found = schedule.synthesis[m]
    return {"placement": placement, "p": p, "m": m, "seconds": seconds, "cpu_s": CPU["auto"], "makespan": found.makespan,
            "baseline": found.baseline, "baseline_makespan": found.baseline_makespan, "method": found.method}


def run(cfg: RunConfig) -> dict[str, Any]:
    curve = cfg.pick(tiny=[(4, 16), (8, 32)], quick=[(8, 128), (32, 512), (64, 1024)],
                     full=[(8, 128), (32, 512), (64, 1024), (128, 2048), (256, 4096)])
    compared = cfg.pick(tiny=(8, 32), quick=(32, 512), full=(64, 1024))
    others_at = cfg.pick(tiny=(4, 16), quick=(32, 256), full=(64, 1024))
    autos = cfg.pick(tiny=[("contiguous", 4, 8)], quick=[("contiguous", 16, 128)],
                     full=[("contiguous", 32, 256), ("v", 32, 256)])
    scale_row("1f1b", {}, 1, 2, 2, reference=False)  # load numpy and the array modules before any timing
    rows = []
    for p, m in curve:
        rows.append(scale_row("1f1b", {}, 1, p, m, reference=(p, m) == compared))
        cfg.log(f"1f1b p={p} m={m}: {rows[-1]['total_s']:.2f} s")
    others = [scale_row(name, options, v, *others_at, reference=False) for name, options, v in OTHERS]
    auto = [auto_row(*shape) for shape in autos]

    def line(row: dict[str, Any]) -> list[str]:
        return [row["schedule"], f"{row['p']}", f"{row['m']}", f"{row['tasks']:,}", f"{row['plan_cpu_s']:.2f}",
                f"{row['validate_cpu_s']:.2f}", f"{row['simulate_cpu_s']:.2f}", f"{row['total_cpu_s']:.2f}",
                f"{row['total_s']:.2f}", f"{row['us_per_task']:.2f}"]

    headers = ["schedule", "p", "m", "tasks", "plan", "validate", "simulate", "total", "wall", "µs/task"]
    table = format_table(headers, [line(r) for r in rows + others], title=TITLE)
    side = next(r for r in rows if "reference_simulate_s" in r)
    speedup_validate = side["reference_validate_cpu_s"] / side["validate_cpu_s"]
    speedup_simulate = side["reference_simulate_cpu_s"] / side["simulate_cpu_s"]
    auto_lines = "\n".join(
        f"  auto {a['placement']} p={a['p']} m={a['m']}: {a['cpu_s']:.2f} s CPU ({a['seconds']:.2f} s wall), "
        f"makespan {a['makespan']:g} "
        f"(best built-in {a['baseline']} {a['baseline_makespan']:g}; {a['method']})" for a in auto)
    notes = (
        "Seconds of this process's CPU (single-threaded work: a quiet machine's wall time; 'wall' is the wall "
        "time of the three on this run, which other processes inflate on a shared machine); µs/task from CPU.\n"
        f"At p={side['p']} m={side['m']} ({side['tasks']:,} tasks) the reference validator takes "
        f"{side['reference_validate_cpu_s']:.2f} s ({speedup_validate:.0f}x the array path) and the reference simulator "
        f"{side['reference_simulate_cpu_s']:.2f} s ({speedup_simulate:.0f}x); same makespan: {side['same_makespan']}, "
        f"same start and end of every task: {side['same_times']}.\n" + auto_lines
    )
    largest = rows[-1]
    targets = [
        Target(f"plan + validate + simulate CPU seconds, 1f1b p={largest['p']} m={largest['m']} "
               f"({largest['tasks']:,} tasks)", largest["total_cpu_s"], 5.0, higher_is_better=False),
        Target("array path = reference (makespan and every start and end)",
               float(side["same_makespan"] and side["same_times"]), 1.0),
    ]
    targets += [Target(f"auto {a['placement']} p={a['p']} m={a['m']} CPU seconds", a["cpu_s"], 10.0,
                       higher_is_better=False) for a in auto]
    return {
        "title": TITLE,
        "table": table + "\n" + notes,
        "targets": targets,
        "workload": {"curve": curve, "compared": compared, "others_at": others_at, "auto": autos,
                     "costs": "F=1 B=2 (W=1); auto: last stage's F=3"},
        "rows": rows,
        "others": others,
        "auto": auto,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_plan_scale", description=TITLE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = parser.parse_args(argv)
    payload = run(RunConfig(level="quick" if args.quick else "full", verbose=False))
    print(json.dumps({k: payload[k] for k in ("rows", "others", "auto")}, indent=1) if args.json else payload["table"])
    for target in payload["targets"]:
        print(target.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
