"""2. Pipeline-1 vs naive-1: what the engine costs when there is nothing to overlap.

One rank, ``chunks=1``: pipesched runs exactly the work of
``loss_fn(model(x), y).backward()``, plus its own machinery (splitting, plan,
worker hand-off, stage-boundary autograd cut, accounting, report). The figure
is naive step time ÷ pipesched step time (1.0: the engine is free), measured
in alternating rounds with checkpointing ``never`` (target >= 0.97).

With checkpointing ``always`` the forward runs twice (once without a graph,
once before the backward); the recompute cost is reported as in torchgpipe:
pipeline-1-never step time ÷ pipeline-1-always step time (a speed ratio,
torchgpipe measured 0.74 on GPU), and naive ÷ pipeline-1-always.
"""

from __future__ import annotations

from typing import Any

from benchmarks.config import RunConfig
from benchmarks.rounds import alternating_rounds, timed
from benchmarks.stats import fmt
from benchmarks.table import format_table
from benchmarks.targets import Target
from benchmarks.workloads import Workload, loss_fn, naive_step, zero_grad
from pipesched import Pipeline

NAME = "pipeline1"
TITLE = "2. Pipeline-1 vs naive-1 (one rank, chunks=1, CPU, 1 thread)"


def _pipe_step(pipe: Pipeline, model, x, y):  # type: ignore[no-untyped-def]
    def step() -> None:
        zero_grad(model)
        pipe.step(x, y)

    return step


def run(cfg: RunConfig) -> dict[str, Any]:
    workload = cfg.pick(
        tiny=Workload(width=32, blocks=2, batch=8),
        quick=Workload(width=256, blocks=4, batch=128),
        full=Workload(width=512, blocks=4, batch=128),
    )
    rounds = cfg.n_rounds(tiny=1, quick=5, full=11)
    steps = cfg.pick(tiny=1, quick=3, full=4)
    model = workload.model()
    x, y = workload.data()
    criterion = loss_fn()
    common = {"devices": ["cpu"], "balance": [len(model)], "chunks": 1, "loss_fn": criterion}
    with Pipeline(model, schedule="gpipe", checkpoint="never", **common) as never, \
            Pipeline(model, schedule="gpipe", checkpoint="always", **common) as always:
        result = alternating_rounds(
            {
                "naive-1": timed(naive_step(model, criterion, x, y)),
                "pipeline-1": timed(_pipe_step(never, model, x, y)),
                "pipeline-1 ckpt": timed(_pipe_step(always, model, x, y)),
            },
            rounds=rounds,
            steps=steps,
            warmup=2,
        )
    speed = result.ratio("naive-1", "pipeline-1")
    speed_ckpt = result.ratio("naive-1", "pipeline-1 ckpt")
    recompute = result.ratio("pipeline-1", "pipeline-1 ckpt")
    rows = [
        ["naive-1", fmt(result.seconds("naive-1"), 2, 1e3), "1 (baseline)"],
        ["pipeline-1 (checkpoint never)", fmt(result.seconds("pipeline-1"), 2, 1e3), fmt(speed)],
        ["pipeline-1 (checkpoint always)", fmt(result.seconds("pipeline-1 ckpt"), 2, 1e3), fmt(speed_ckpt)],
    ]
    table = format_table(["contender", "ms/step", "naive/contender (speed)"], rows, title=TITLE)
    table += (
        f"\nrecompute cost (pipeline-1 never / pipeline-1 always, speed ratio; torchgpipe GPU: 0.74): {fmt(recompute)}"
        f"\nmodel: residual_mlp width {workload.width}, {workload.blocks} blocks, batch {workload.batch}; "
        f"{rounds} alternating rounds x {steps} steps; median [min..max] over rounds"
    )
    targets = [Target("pipeline-1 speed vs naive-1 (naive/pipesched step time)", float(speed["median"]), 0.97)]
    return {
        "title": TITLE,
        "table": table,
        "targets": targets,
        "workload": workload.as_dict(),
        "rounds": result.as_dict(),
        "naive_over_pipeline": speed,
        "naive_over_pipeline_checkpointed": speed_ckpt,
        "recompute_speed_ratio": recompute,
    }
