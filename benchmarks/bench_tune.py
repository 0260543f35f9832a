"""13. ``pipesched.tune`` on calibrated sleep layers: predicted vs measured step time, chosen vs brute-force best.

The model: :func:`benchmarks.sleep_layers.sleep_model`, layers whose F, B and W
sleep ``fixed + rows × per-row`` (so micro-batch size matters and a per-call
cost makes tiny micro-batches expensive), of unequal cost: six light layers
and a heavy head. ``pipesched.tune`` profiles it at each micro-batch size,
balances it exactly for each schedule's placement and predicts every
candidate of a small grid (schedules × chunks, checkpoint ``"never"``). Then
*every* candidate of the grid runs for real (its own ``Pipeline`` with the
balance tune chose for it), in alternating rounds, median step time.

Targets (issue 14): each of the top 3 predicted candidates within 15 % of its
measured time; the candidate tune ranks first (``measure=0``) within 10 % of
the fastest one found by measuring every candidate (brute force).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import pipesched
from benchmarks.config import RunConfig
from benchmarks.rounds import alternating_rounds, timed
from benchmarks.sleep_layers import sleep_model
from benchmarks.stats import fmt
from benchmarks.table import format_table
from benchmarks.targets import Target
from pipesched import Pipeline

NAME = "tune"
TITLE = "13. tune on calibrated sleep layers (heavy head): predicted vs measured, chosen vs brute-force best"
RANKS = 2
PREDICTION_TOLERANCE = 0.15
CHOICE_TOLERANCE = 0.10


def run(cfg: RunConfig) -> dict[str, Any]:
    per_row_ms = cfg.pick(tiny=[0.05] * 3 + [0.3], quick=[0.5] * 6 + [3.0], full=[1.0] * 6 + [6.0])
    fixed_ms = cfg.pick(tiny=0.1, quick=2.0, full=3.0)
    batch = cfg.pick(tiny=8, quick=16, full=16)
    schedules = cfg.pick(tiny=["gpipe", "1f1b"], quick=["gpipe", "1f1b", "zb-h1", "interleaved-1f1b"],
                         full=["gpipe", "1f1b", "zb-h1", "interleaved-1f1b", "zb-v"])
    chunks = cfg.pick(tiny=[2, 4], quick=[2, 4, 8], full=[2, 4, 8, 16])
    rounds = cfg.n_rounds(tiny=1, quick=5, full=7)
    model = sleep_model(per_row_ms, fixed_ms)
    x, y = torch.zeros(batch, 1), torch.zeros(batch, 1)
    loss = nn.MSELoss()
    result = pipesched.tune(model, x, y, loss, devices=["cpu"] * RANKS, schedules=schedules, chunks=chunks,
                            checkpoint=["never"], repeat=cfg.pick(tiny=1, quick=3, full=5),
                            measure=0, unpipelined=False)  # the predictions alone; plan_real measures with both
    candidates = result.candidates
    label = {id(c): f"{c.schedule} m={c.chunks}" for c in candidates}
    cfg.log(f"{len(candidates)} candidates predicted; measuring all of them, {rounds} rounds")

    pipes: dict[str, Pipeline] = {}
    models: dict[str, nn.Sequential] = {}
    try:
        for c in candidates:
            models[label[id(c)]] = sleep_model(per_row_ms, fixed_ms)
            pipes[label[id(c)]] = Pipeline(models[label[id(c)]], **c.pipeline_kwargs(), loss_fn=loss)

        def stepper(name: str):
            def step() -> None:
                models[name].zero_grad(set_to_none=True)
                pipes[name].step(x, y)
            return step

        measured = alternating_rounds({n: timed(stepper(n)) for n in pipes}, rounds=rounds, steps=1, warmup=1)
    finally:
        for pipe in pipes.values():
            pipe.close()

    rows = []
    for rank, c in enumerate(candidates):
        seconds = measured.seconds(label[id(c)])
        real = float(seconds["median"])
        rows.append({"rank": rank + 1, "schedule": c.schedule, "chunks": c.chunks, "balance": c.balance,
                     "predicted_s": c.predicted_step_s, "measured_s": real, "measured": seconds,
                     "error": abs(c.predicted_step_s - real) / real})
    fastest = min(rows, key=lambda r: r["measured_s"])
    chosen = rows[0]
    choice_ratio = chosen["measured_s"] / fastest["measured_s"]
    targets = [
        Target(f"top {r['rank']} ({r['schedule']} m={r['chunks']}) |predicted - measured| / measured", r["error"],
               PREDICTION_TOLERANCE, higher_is_better=False,
               note=f"predicted {r['predicted_s'] * 1e3:.1f} ms, measured {r['measured_s'] * 1e3:.1f} ms")
        for r in rows[:3]
    ]
    targets.append(Target(
        "chosen (tune's rank 1, measure=0) measured / brute-force best measured", choice_ratio,
        1 + CHOICE_TOLERANCE, higher_is_better=False,
        note=f"chosen {chosen['schedule']} m={chosen['chunks']}, best {fastest['schedule']} m={fastest['chunks']}"))
    table = format_table(
        ["tune rank", "schedule", "chunks", "balance", "predicted ms", "measured ms", "|pred-meas|/meas"],
        [[r["rank"], r["schedule"], r["chunks"], ",".join(map(str, r["balance"])), f"{r['predicted_s'] * 1e3:.1f}",
          fmt({k: v * 1e3 for k, v in r["measured"].items()}, 1), f"{100 * r['error']:.1f} %"] for r in rows],
        title=TITLE,
    )
    notes = (
        f"{RANKS} CPU ranks, batch {batch}, layers per-row ms {per_row_ms} (F = B = W each) + {fixed_ms} ms per pass; "
        f"measured: median [min..max] of pipe.step over {rounds} alternating rounds.\n"
        f"brute-force best: {fastest['schedule']} m={fastest['chunks']} ({fastest['measured_s'] * 1e3:.1f} ms); "
        f"tune's choice: {chosen['schedule']} m={chosen['chunks']} ({chosen['measured_s'] * 1e3:.1f} ms), "
        f"chosen/best {choice_ratio:.3f}."
    )
    return {
        "title": TITLE,
        "table": table + "\n" + notes,
        "targets": targets,
        "workload": {"ranks": RANKS, "batch": batch, "per_row_ms": per_row_ms, "fixed_ms": fixed_ms,
                     "schedules": schedules, "chunks": chunks, "rounds": rounds},
        "rows": rows,
        "chosen_over_best": choice_ratio,
    }
