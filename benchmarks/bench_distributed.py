"""14. pipesched's multi-process protocol against torch.distributed.pipelining, A/B, m = 4 and 8.

Both contenders run in two gloo processes of their own on 127.0.0.1, one
intra-op thread each, on the same model (residual MLP, width 512, 8 blocks),
the same batch (64 rows), the same split (input layer + half the blocks |
the rest), the same schedule (1F1B), checkpointing off:

* peer: ``torch.distributed.pipelining`` (``PipelineStage`` + ``Schedule1F1B``);
* pipesched: :class:`~pipesched.distributed.DistributedPipeline` of this tree;
* with ``PIPESCHED_BASELINE_SRC=DIR`` (a directory holding another
  ``pipesched`` package, e.g. ``git archive main pipesched | tar -x -C DIR``)
  a third contender runs that version: the A/B of a protocol change in the
  same run.

Alternating rounds, several steps each; the figures are per-round ratios of
samples/s (the machine is shared: absolute times are noise), and of the CPU
seconds both processes of a contender used per step (all their threads; a
figure other processes disturb far less than wall time, and the one that
shows protocol overhead: a rank's time waiting in a receive is not CPU time). Before timing,
one step of each from zero gradients is compared with the un-pipelined
model's gradients.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

from benchmarks.config import RunConfig
from benchmarks.gloo_peers import GlooPeers
from benchmarks.rounds import alternating_rounds
from benchmarks.stats import fmt, summary
from benchmarks.table import format_table
from benchmarks.targets import Target
from benchmarks.workloads import (
    GRAD_RTOL,
    Workload,
    grad_difference,
    grads_match,
    reference_grads,
)

NAME = "distributed"
TITLE = "14. DistributedPipeline vs torch.distributed.pipelining (2 gloo processes, 1F1B, A/B)"
PEER = "torch.distributed.pipelining"
OURS = "pipesched"
BASELINE = "pipesched (baseline)"
TARGET = 1.1


def run(cfg: RunConfig) -> dict[str, Any]:
    chunk_counts = cfg.pick(tiny=[2], quick=[4, 8], full=[4, 8])
    rounds = cfg.n_rounds(tiny=1, quick=5, full=11)
    steps = cfg.pick(tiny=1, quick=5, full=10)
    baseline_src = os.environ.get("PIPESCHED_BASELINE_SRC")
    rows: list[list[object]] = []
    grad_rows: list[list[object]] = []
    per_m: dict[str, Any] = {}
    targets: list[Target] = []
    for chunks in chunk_counts:
        workload = cfg.pick(
            tiny=Workload(width=32, blocks=2, batch=8, chunks=chunks),
            quick=Workload(width=512, blocks=8, batch=64, chunks=chunks),
            full=Workload(width=512, blocks=8, batch=64, chunks=chunks),
        )
        balance = workload.two_rank_balance()
        spec = {"workload": workload.as_dict(), "schedule": "1f1b", "balance": balance, "threads": 1}
        kinds = {PEER: {**spec, "mode": "pipelining"}, OURS: {**spec, "mode": "pipesched"}}
        if baseline_src:
            kinds[BASELINE] = {**spec, "mode": "pipesched", "sys_path": baseline_src}
        reference = reference_grads(workload)
        with ExitStack() as stack:
            groups = {name: stack.enter_context(GlooPeers(s)) for name, s in kinds.items()}
            cfg.log(f"m = {chunks}: {', '.join(groups)} ready")
            grads = {name: grad_difference(group.grads(), reference) for name, group in groups.items()}
            result = alternating_rounds({name: group.run for name, group in groups.items()},
                                        rounds=rounds, steps=steps, warmup=cfg.pick(tiny=1, quick=3, full=3))
            groups_cpu = {name: list(group.cpu_seconds) for name, group in groups.items()}
        cpu = {name: [c / steps for c in seconds[1:]] for name, seconds in groups_cpu.items()}  # [0]: warm-up
        cpu_ratio = summary([p / o for p, o in zip(cpu[PEER], cpu[OURS])])  # peer CPU ÷ ours, per round
        ratio = result.ratio(PEER, OURS)  # ours samples/s ÷ peer samples/s, per round
        entry: dict[str, Any] = {"ratio_over_peer": ratio, "gradients": grads, "rounds": result.as_dict(),
                                 "cpu_seconds_per_step": cpu, "cpu_peer_over_ours": cpu_ratio}
        rows.append([chunks, f"{OURS} / {PEER}", fmt(ratio)])
        rows.append([chunks, f"CPU s/step: {PEER} / {OURS}", fmt(cpu_ratio)])
        if baseline_src:
            entry["baseline_over_peer"] = result.ratio(PEER, BASELINE)
            entry["ours_over_baseline"] = result.ratio(BASELINE, OURS)
            rows.append([chunks, f"{BASELINE} / {PEER}", fmt(entry["baseline_over_peer"])])
            rows.append([chunks, f"{OURS} / {BASELINE}", fmt(entry["ours_over_baseline"])])
            entry["cpu_baseline_over_ours"] = summary([b / o for b, o in zip(cpu[BASELINE], cpu[OURS])])
            rows.append([chunks, f"CPU s/step: {BASELINE} / {OURS}", fmt(entry["cpu_baseline_over_ours"])])
        for name in groups:
            rows.append([chunks, f"{name} ms/step", fmt(result.seconds(name), 2, 1e3)])
            d = grads[name]
            grad_rows.append([chunks, f"{name} vs un-pipelined", f"{float(d['relative']):.2e}",
                              "yes" if grads_match(d) else "NO"])
        per_m[str(chunks)] = entry
        targets.append(Target(f"{OURS} / {PEER} samples/s (2 processes, 1F1B, m={chunks})",
                              float(ratio["median"]), TARGET))
    table = format_table(["m", "figure", "median [min..max]"], rows, title=TITLE)
    table += "\n" + format_table(["m", "gradients (one step, float32)", "relative", f"match (<= {GRAD_RTOL:g})"],
                                 grad_rows)
    table += (f"\n{rounds} alternating rounds x {steps} steps; ratios are samples/s per round (> 1: faster "
              f"than the peer); baseline: {baseline_src or 'not set (PIPESCHED_BASELINE_SRC)'}")
    all_match = all(grads_match(d) for e in per_m.values() for d in e["gradients"].values())
    targets.append(Target("gradients: every contender matches the un-pipelined model (1 = all)",
                          float(all_match), 1.0))
    return {"title": TITLE, "table": table, "targets": targets, "per_m": per_m, "baseline_src": baseline_src}
