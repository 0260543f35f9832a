"""12. ``auto`` against the best built-in schedule on a grid of cost models, in the simulator.

For every cell (p ranks, m micro-batches, a cost model, a memory cap) the
built-ins of the contiguous placement (GPipe, 1F1B, ZB-H1) are built as a
user would build them for those costs (``get_schedule(name, costs=...,
comm=...)`` where the schedule takes them: ZB-H1 then tunes its order), those
that fit the cap are simulated, and the fastest is the yardstick. ``auto``
gets the same costs and cap. Both are priced by :func:`pipesched.simulate`
with the same costs (an unsplit backward costs B + W); in-flight memory is
the simulator's ``peak_inflight`` per rank.

Cost models (per stage; F = B = W = 1 unless said):

* ``equal``: the zero-bubble papers' point;
* ``heavy-first``: stage 0's F and B cost 2 (an embedding, a data-loading stage);
* ``heavy-last``: the last stage's F costs 1.5 and B 3 (a language model's head and loss);
* ``W=B/2``: every W costs 0.5 (weight gradients cheaper than input gradients);
* ``comm``: 0.3 added on every hop between ranks.

Memory caps (per rank, in micro-batches in flight): ``none``; ``1f1b``
(rank r holds at most p - r, 1F1B's own profile: ZB-H1, which holds p on
every rank, does not fit); ``p/2`` (no built-in fits; ``auto`` is then
compared with the best uncapped built-in, to show what the memory costs).

It is deterministic (no clock in the answer); the only timing is how long
``auto`` takes to plan, given for information.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from benchmarks.config import RunConfig
from benchmarks.table import format_table
from benchmarks.targets import Target
from pipesched import get_schedule, simulate

NAME = "auto"
TITLE = "12. auto vs the best built-in (gpipe, 1f1b, zb-h1) on a grid of cost models, simulated makespan"
BUILT_INS = ("gpipe", "1f1b", "zb-h1")
MODELS = ("equal", "heavy-first", "heavy-last", "W=B/2", "comm")
CAPS = ("none", "1f1b", "p/2")


def cost_model(name: str, p: int) -> tuple[dict[tuple[str, int], float], float]:
    costs = {(kind, s): 1.0 for s in range(p) for kind in "FBW"}
    if name == "heavy-first":
        costs.update({("F", 0): 2.0, ("B", 0): 2.0})
    elif name == "heavy-last":
        costs.update({("F", p - 1): 1.5, ("B", p - 1): 3.0})
    elif name == "W=B/2":
        costs.update({("W", s): 0.5 for s in range(p)})
    return costs, (0.3 if name == "comm" else 0.0)


def memory_cap(name: str, p: int) -> list[int] | None:
    return {"none": None, "1f1b": [p - r for r in range(p)], "p/2": [max(1, p // 2)] * p}[name]


def best_built_in(p: int, m: int, costs: dict, comm: float, cap: list[int] | None) -> tuple[str, float] | None:
    best = None
    for name in BUILT_INS:
        try:
            schedule = get_schedule(name, costs=costs, comm=comm)
        except TypeError:  # takes no costs
            schedule = get_schedule(name)
        sim = simulate(schedule.plan(p, m, p), costs, comm=comm)
        if cap is not None and any(h > c for h, c in zip(sim.peak_inflight, cap)):
            continue
        if best is None or sim.makespan < best[1]:
            best = (name, sim.makespan)
    return best


def cell(p: int, m: int, model: str, cap_name: str) -> dict[str, Any]:
    costs, comm = cost_model(model, p)
    cap = memory_cap(cap_name, p)
    rival = best_built_in(p, m, costs, comm, cap)
    uncapped = rival if cap is None else best_built_in(p, m, costs, comm, None)
    schedule = get_schedule("auto", costs=costs, comm=comm, memory_limit=cap)
    began = time.perf_counter()
    plan = schedule.plan(p, m, p)
    seconds = time.perf_counter() - began
    sim = simulate(plan, costs, comm=comm)
    found = schedule.synthesis[m]
    return {
        "p": p, "m": m, "costs": model, "cap": cap_name,
        "built_in": rival[0] if rival else None,
        "built_in_makespan": rival[1] if rival else None,
        "uncapped_built_in": uncapped[0] if uncapped else None,
        "uncapped_built_in_makespan": uncapped[1] if uncapped else None,
        "auto_makespan": sim.makespan,
        "ratio": sim.makespan / rival[1] if rival else None,
        "ratio_to_uncapped": sim.makespan / uncapped[1] if uncapped else None,
        "bound": found.bound,
        "peak_inflight": sim.peak_inflight,
        "fits": cap is None or all(h <= c for h, c in zip(sim.peak_inflight, cap)),
        "method": found.method,
        "plan_seconds": seconds,
    }


def grid(cfg: RunConfig) -> list[tuple[int, int]]:
    return cfg.pick(tiny=[(4, 8)], quick=[(4, 8), (4, 16), (8, 16)],
                    full=[(p, m) for p in (4, 8) for m in (8, 16, 32)] + [(8, 64)])


def ratio_text(row: dict[str, Any]) -> str:
    if row["ratio"] is not None:
        at_bound = row["built_in_makespan"] <= row["bound"] * (1 + 1e-9)
        return f"{row['ratio']:.3f}" + ("*" if at_bound else "")
    return f"({row['ratio_to_uncapped']:.2f})"


def run(cfg: RunConfig) -> dict[str, Any]:
    shapes = grid(cfg)
    models = cfg.pick(tiny=("equal", "W=B/2"), quick=MODELS, full=MODELS)
    rows = [cell(p, m, model, cap) for cap in CAPS for model in models for p, m in shapes]
    cfg.log(f"{len(rows)} cells, auto planned in {max(r['plan_seconds'] for r in rows):.2f} s at most")

    by_key = {(r["costs"], r["cap"], r["p"], r["m"]): r for r in rows}
    pivot_rows = []
    for cap in CAPS:
        for model in models:
            some = by_key[(model, cap) + shapes[0]]
            pivot_rows.append([model, cap, some["built_in"] or "none fits"]
                              + [ratio_text(by_key[(model, cap, p, m)]) for p, m in shapes])
    headers = ["costs", "memory cap", "best built-in"] + [f"p={p} m={m}" for p, m in shapes]
    compared = [r for r in rows if r["ratio"] is not None]
    worst = max(r["ratio"] for r in compared)
    wins = [r for r in compared if r["ratio"] < 1 - 1e-9]
    table = format_table(headers, pivot_rows, title=TITLE + ": auto makespan / best built-in's")
    notes = (
        "Each cell: auto's simulated makespan / the fastest built-in that fits the cap (tuned for the costs "
        "where it takes them); < 1 is a win. 1.000* a tie where the built-in is already at the span bound "
        "(no order can beat it); 1.000 without * a tie auto found no way past. (x): no built-in fits the cap; "
        "auto / the best uncapped built-in.\n"
        f"auto is strictly faster in {len(wins)} of {len(compared)} comparable cells; worst ratio {worst:.3f}; "
        f"every auto plan fits its cap: {all(r['fits'] for r in rows)}. Planning took "
        f"{statistics.median(r['plan_seconds'] for r in rows) * 1e3:.0f} ms median, "
        f"{max(r['plan_seconds'] for r in rows):.2f} s at most (shared machine; information only)."
    )
    targets = [
        Target("auto makespan / best built-in, worst cell (never worse)", worst, 1.0 + 1e-9, higher_is_better=False),
        Target("auto plans within the memory cap (share of cells)", sum(r["fits"] for r in rows) / len(rows), 1.0),
    ]
    return {
        "title": TITLE,
        "table": table + "\n" + notes,
        "targets": targets,
        "workload": {"shapes": shapes, "costs": list(models), "caps": list(CAPS), "built_ins": list(BUILT_INS)},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_auto", description=TITLE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = parser.parse_args(argv)
    payload = run(RunConfig(level="quick" if args.quick else "full", verbose=False))
    print(json.dumps(payload["rows"], indent=1) if args.json else payload["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
