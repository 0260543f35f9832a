"""3. CPU-core pipeline speed-up: 2 ranks on 2 cores vs the same micro-batches on one.

One process, one intra-op thread everywhere (``torch.set_num_threads(1)``
before the pipelines exist, so each worker thread also runs its ops on one
thread; a probe records what every thread really used). The baseline is the
plain model running the *same micro-batches* accumulated in a loop on one
thread, because on a CPU micro-batching has a cost of its own (smaller
matrix products, gradient accumulation per micro-batch), and that cost is not
what pipelining adds. pipesched runs 2 ranks (stage 0: input layer + half the
blocks; stage 1: the other half + norm + head), checkpoint ``never`` like the
baseline.

Figure: speed-up = baseline step time ÷ pipeline step time, per alternating
round, against the ideal two-stage speed-up 2m/(m+1) (the fill and drain of a
2-stage pipeline). Target: >= 92 % of ideal.
"""

from __future__ import annotations

from typing import Any

from benchmarks.config import RunConfig
from benchmarks.rounds import alternating_rounds, timed
from benchmarks.stats import fmt, summary
from benchmarks.table import format_table
from benchmarks.targets import Target
from benchmarks.threads import ThreadProbe
from benchmarks.workloads import Workload, loss_fn, naive_step, zero_grad
from pipesched import Pipeline

NAME = "cpu_speedup"
TITLE = "3. CPU-core pipeline speed-up: 2 ranks on 2 cores vs the same micro-batches on 1 thread"
SCHEDULES = ("gpipe", "1f1b")
TARGET = 0.92


def ideal_speedup(m: int, stages: int = 2) -> float:
    return stages * m / (m + stages - 1)


def run(cfg: RunConfig) -> dict[str, Any]:
    base = cfg.pick(
        tiny=Workload(width=32, blocks=2, batch=16),
        quick=Workload(width=512, blocks=8, batch=128),
        full=Workload(width=1024, blocks=8, batch=256),
    )
    chunk_counts = cfg.pick(tiny=[2], quick=[4, 8], full=[4, 8, 16])
    rounds = cfg.n_rounds(tiny=1, quick=3, full=7)
    model = base.model()
    x, y = base.data()
    criterion = loss_fn()
    balance = base.two_rank_balance()
    rows, table_rows, targets, threads_seen = [], [], [], {}
    for m in chunk_counts:
        pipes = {
            s: Pipeline(model, schedule=s, balance=balance, devices=["cpu", "cpu"], chunks=m,
                        checkpoint="never", loss_fn=criterion)
            for s in SCHEDULES
        }
        try:
            contenders = {"baseline": timed(naive_step(model, criterion, x, y, chunks=m))}
            for s, pipe in pipes.items():
                def step(pipe: Pipeline = pipe) -> None:
                    zero_grad(model)
                    pipe.step(x, y)
                contenders[s] = timed(step)
            with ThreadProbe(model.children()) as probe:
                result = alternating_rounds(contenders, rounds=rounds, steps=1, warmup=1)
            threads_seen.update(probe.seen)
        finally:
            for pipe in pipes.values():
                pipe.close()
        ideal = ideal_speedup(m)
        for s in SCHEDULES:
            speedup = result.ratio("baseline", s)
            of_ideal = summary([v / ideal for v in result.ratios("baseline", s)])
            rows.append({"microbatches": m, "schedule": s, "ideal": ideal, "speedup": speedup,
                         "fraction_of_ideal": of_ideal, "rounds": result.as_dict()})
            table_rows.append([
                m, s, fmt(result.seconds("baseline"), 1, 1e3), fmt(result.seconds(s), 1, 1e3),
                fmt(speedup), f"{ideal:.3f}", fmt(of_ideal),
            ])
            targets.append(Target(f"{s} speed-up / ideal at m={m}", float(of_ideal["median"]), TARGET))
        cfg.log(f"m={m}: " + ", ".join(f"{r['schedule']} {fmt(r['fraction_of_ideal'])} of ideal" for r in rows if r["microbatches"] == m))
    headers = ["m", "schedule", "baseline ms", "pipeline ms", "speed-up", "ideal 2m/(m+1)", "of ideal"]
    table = format_table(headers, table_rows, title=TITLE)
    table += (
        f"\nmodel: residual_mlp width {base.width}, {base.blocks} blocks, batch {base.batch}, balance {balance}, "
        f"checkpoint never; {rounds} alternating rounds; median [min..max]"
        f"\nintra-op threads seen per thread: {dict(sorted(threads_seen.items()))}"
    )
    return {
        "title": TITLE,
        "table": table,
        "targets": targets,
        "workload": base.as_dict(),
        "balance": balance,
        "threads_seen": threads_seen,
        "rows": rows,
    }
