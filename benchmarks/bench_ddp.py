"""5. Against data parallelism: what a user whose model fits on each core would pick instead.

``DistributedDataParallel`` over 2 gloo processes on 127.0.0.1, one intra-op
thread each, each process on its half of the global batch (one forward and
backward, gradients all-reduced) vs pipesched with 2 ranks (1F1B, m
micro-batches, checkpoint ``never``) on the same model, weights and global
batch. The plain model on one thread over the whole batch is the common
baseline (DDP's ideal is 2x it; a pipeline's is 2m/(m+1) x its own
micro-batched baseline, which on a CPU is slower than the whole batch).

Figure: pipesched samples/s ÷ DDP samples/s per alternating round. No
target: the verdict says which wins here. Gradients of one step are compared
with the un-pipelined model's.
"""

from __future__ import annotations

from typing import Any

from benchmarks.bench_torch_pipelining import grad_rows
from benchmarks.config import RunConfig
from benchmarks.gloo_peers import GlooPeers
from benchmarks.rounds import alternating_rounds, timed
from benchmarks.stats import fmt
from benchmarks.table import format_table
from benchmarks.targets import Target
from benchmarks.workloads import (
    GRAD_RTOL,
    Workload,
    grad_difference,
    fresh_step,
    grads_match,
    loss_fn,
    naive_step,
    named_grads,
    reference_grads,
    zero_grad,
)
from pipesched import Pipeline

NAME = "ddp"
TITLE = "5. pipesched (2 ranks, 1F1B) vs DistributedDataParallel (2 gloo processes), 1 thread each"
DDP = "DistributedDataParallel"


def run(cfg: RunConfig) -> dict[str, Any]:
    workload = cfg.pick(
        tiny=Workload(width=32, blocks=2, batch=8, chunks=2),
        quick=Workload(width=512, blocks=8, batch=64, chunks=4),
        full=Workload(width=512, blocks=8, batch=64, chunks=4),
    )
    rounds = cfg.n_rounds(tiny=1, quick=3, full=7)
    steps = cfg.pick(tiny=1, quick=5, full=10)
    balance = workload.two_rank_balance()
    model = workload.model()
    x, y = workload.data()
    criterion = loss_fn()
    reference = reference_grads(workload)
    spec = {"mode": "ddp", "workload": workload.as_dict(), "threads": 1}
    baseline = "naive (whole batch, 1 thread)"
    with Pipeline(model, schedule="1f1b", balance=balance, devices=["cpu", "cpu"], chunks=workload.chunks,
                  checkpoint="never", loss_fn=criterion) as pipe, GlooPeers(spec) as peers:
        cfg.log(f"DDP peers ready on port {peers.port}: {peers.info}")
        zero_grad(model)
        pipe.step(x, y)
        ours = named_grads(model)
        theirs = peers.grads()
        grads = {
            "pipesched vs un-pipelined": grad_difference(ours, reference),
            f"{DDP} vs un-pipelined": grad_difference(theirs, reference),
        }

        result = alternating_rounds(
            {
                DDP: peers.run,
                "pipesched": timed(fresh_step(pipe.step, model, x, y)),
                baseline: timed(naive_step(model, criterion, x, y, 1)),
            },
            rounds=rounds,
            steps=steps,
            warmup=cfg.pick(tiny=1, quick=3, full=3),
        )
    ratio = result.ratio(DDP, "pipesched")  # pipesched samples/s ÷ DDP samples/s
    per_contender = result.throughput(workload.batch, baseline)
    rows = [
        [name, fmt(c["seconds_per_step"], 1, 1e3), fmt(c["samples_per_s"], 0), fmt(c["speedup_vs_baseline"])]
        for name, c in per_contender.items()
    ]
    winner = "pipesched" if float(ratio["median"]) > 1 else DDP
    table = format_table(["contender", "ms/step", "samples/s", "speed-up vs whole batch"], rows, title=TITLE)
    table += f"\npipesched / {DDP} (samples/s ratio per round): {fmt(ratio)} -> {winner} wins here"
    table += "\n" + format_table(["gradients (one step, float32)", "max |diff|", "relative", f"match (<= {GRAD_RTOL:g})"],
                                 grad_rows(grads))
    table += (
        f"\nmodel: residual_mlp width {workload.width}, {workload.blocks} blocks, global batch {workload.batch} "
        f"(DDP: {workload.batch // 2} per process; pipesched: m = {workload.chunks}, balance {balance}); "
        f"{rounds} alternating rounds x {steps} steps; median [min..max]"
    )
    targets = [Target("gradients: pipesched, DDP and un-pipelined agree (1 = all match)",
                      float(all(grads_match(d) for d in grads.values())), 1.0)]
    return {
        "title": TITLE,
        "table": table,
        "targets": targets,
        "workload": workload.as_dict(),
        "balance": balance,
        "ratio_pipesched_over_ddp": ratio,
        "winner": winner,
        "contenders": per_contender,
        "gradients": grads,
        "rounds": result.as_dict(),
    }
