"""4. Side by side with ``torch.distributed.pipelining`` (torch's own pipeline, the strongest peer).

Same model (residual MLP), same weights (same seed), same batch, same
micro-batches, same schedule (1F1B), same split (input layer + half the
blocks | the rest), checkpointing off on both sides, one intra-op thread per
rank on both sides:

* peer: ``torch.distributed.pipelining`` (``PipelineStage`` + ``Schedule1F1B``)
  in 2 gloo processes on 127.0.0.1;
* pipesched: 2 CPU ranks (threads) in this process;
* pipesched multi-process: ``DistributedPipeline`` in 2 gloo processes of its
  own, the same transport and process layout as the peer (target >= 1.1);
* baseline: the plain model on one thread running the same micro-batches,
  which puts both against the ideal two-stage speed-up 2m/(m+1).

Alternating rounds of a few steps each; the figure is pipesched samples/s ÷
peer samples/s per round (target >= 1.15: it pays no inter-process copies). Before timing, one step of each
from zero gradients is compared with the un-pipelined model's gradients and
with each other.
"""

from __future__ import annotations

from typing import Any

from benchmarks.bench_cpu_speedup import ideal_speedup
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
    grads_match,
    fresh_step,
    loss_fn,
    naive_step,
    named_grads,
    reference_grads,
    zero_grad,
)
from pipesched import Pipeline

NAME = "torch_pipelining"
TITLE = "4. pipesched vs torch.distributed.pipelining (1F1B, 2 ranks, 1 thread each)"
PEER = "torch.distributed.pipelining"
TARGET = 1.15
TARGET_PROCESSES = 1.1
OURS_MP = "pipesched (2 processes)"


def grad_rows(pairs: dict[str, dict[str, object]]) -> list[list[object]]:
    return [
        [name, f"{float(d['max_abs_diff']):.2e}", f"{float(d['relative']):.2e}", "yes" if grads_match(d) else "NO"]
        for name, d in pairs.items()
    ]


def run(cfg: RunConfig) -> dict[str, Any]:
    workload = cfg.pick(
        tiny=Workload(width=32, blocks=2, batch=8, chunks=2),
        quick=Workload(width=512, blocks=8, batch=64, chunks=4),
        full=Workload(width=512, blocks=8, batch=64, chunks=4),
    )
    rounds = cfg.n_rounds(tiny=1, quick=3, full=9)
    steps = cfg.pick(tiny=1, quick=5, full=10)
    schedule = "1f1b"
    balance = workload.two_rank_balance()
    model = workload.model()
    x, y = workload.data()
    criterion = loss_fn()
    reference = reference_grads(workload)
    spec = {"mode": "pipelining", "workload": workload.as_dict(), "schedule": schedule, "balance": balance, "threads": 1}
    ours_spec = {**spec, "mode": "pipesched"}
    with Pipeline(model, schedule=schedule, balance=balance, devices=["cpu", "cpu"], chunks=workload.chunks,
                  checkpoint="never", loss_fn=criterion) as pipe, GlooPeers(spec) as peers, \
            GlooPeers(ours_spec) as ours_mp:
        cfg.log(f"peers ready on port {peers.port}: {peers.info}")
        zero_grad(model)
        pipe.step(x, y)
        ours = named_grads(model)
        theirs = peers.grads()
        ours_processes = ours_mp.grads()
        grads = {
            "pipesched vs un-pipelined": grad_difference(ours, reference),
            f"{OURS_MP} vs un-pipelined": grad_difference(ours_processes, reference),
            f"{PEER} vs un-pipelined": grad_difference(theirs, reference),
            f"pipesched vs {PEER}": grad_difference(ours, theirs),
            f"{OURS_MP} vs {PEER}": grad_difference(ours_processes, theirs),
        }

        result = alternating_rounds(
            {
                PEER: peers.run,
                OURS_MP: ours_mp.run,
                "pipesched": timed(fresh_step(pipe.step, model, x, y)),
                "naive (same micro-batches, 1 thread)": timed(naive_step(model, criterion, x, y, workload.chunks)),
            },
            rounds=rounds,
            steps=steps,
            warmup=cfg.pick(tiny=1, quick=3, full=3),
        )
    baseline = "naive (same micro-batches, 1 thread)"
    ideal = ideal_speedup(workload.chunks)
    ratio = result.ratio(PEER, "pipesched")  # pipesched samples/s ÷ peer samples/s
    ratio_processes = result.ratio(PEER, OURS_MP)
    per_contender = result.throughput(workload.batch, baseline)
    rows = [
        [name, fmt(c["seconds_per_step"], 1, 1e3), fmt(c["samples_per_s"], 0), fmt(c["speedup_vs_baseline"]),
         "" if name == baseline else f"{float(c['speedup_vs_baseline']['median']) / ideal:.3f}"]
        for name, c in per_contender.items()
    ]
    table = format_table(["contender", "ms/step", "samples/s", "speed-up vs naive", "of ideal"], rows, title=TITLE)
    table += f"\npipesched / {PEER} (samples/s ratio per round): {fmt(ratio)}"
    table += f"\n{OURS_MP} / {PEER} (same processes, same gloo transport): {fmt(ratio_processes)}"
    table += "\n" + format_table(["gradients (one step, float32)", "max |diff|", "relative", f"match (<= {GRAD_RTOL:g})"],
                                 grad_rows(grads))
    table += (
        f"\nmodel: residual_mlp width {workload.width}, {workload.blocks} blocks, batch {workload.batch}, "
        f"m = {workload.chunks}, balance {balance}, checkpoint never; ideal 2m/(m+1) = {ideal:.3f}; "
        f"{rounds} alternating rounds x {steps} steps; median [min..max]"
    )
    targets = [Target(f"pipesched / {PEER} samples/s (1F1B, m={workload.chunks})", float(ratio["median"]), TARGET)]
    targets.append(Target(f"{OURS_MP} / {PEER} samples/s (1F1B, m={workload.chunks})",
                          float(ratio_processes["median"]), TARGET_PROCESSES))
    targets.append(Target("gradients: pipesched, peer and un-pipelined agree (1 = all match)",
                          float(all(grads_match(d) for d in grads.values())), 1.0))
    return {
        "title": TITLE,
        "table": table,
        "targets": targets,
        "workload": workload.as_dict(),
        "balance": balance,
        "peer_info": {str(k): v for k, v in peers.info.items()},
        "ratio_pipesched_over_peer": ratio,
        "ratio_pipesched_processes_over_peer": ratio_processes,
        "contenders": per_contender,
        "gradients": grads,
        "rounds": result.as_dict(),
    }
