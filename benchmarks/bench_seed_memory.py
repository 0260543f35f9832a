"""Seed table 2: the largest AmoebaNet-D (L, D) that trains under a fixed per-rank memory, in real bytes.

torchgpipe's memory table trains AmoebaNet-D on GPUs of one size and reports
the largest (L, D) that fits: baseline (no pipeline) (18, 208), pipeline-1
(18, 416), -2 (18, 544), -4 (36, 544), -8 (72, 512). Here every rank is its
own process (:mod:`benchmarks.seed_memory_worker`), so a rank's real memory
is its process's heap (glibc, :mod:`benchmarks.heap`): parameters,
gradients, activations, transfers and temporaries, peak over one training
step (forward, backward, SGD update) after a warm-up step. A configuration
*fits* when every rank's peak stays under the budget. The budget gives the
table the seed's shape: it is what the baseline needs to train the
calibration rung ((6, 32): the seed's (18, 208) with a third of the layers and
an input of 32 x 32), measured at the start of the run, plus 2 %.

Rows: the plain model in one process (baseline), then for p = 1, 2, 4, 8
ranks: GPipe with ``checkpoint="except_last"`` (torchgpipe's default, the
seed's setting), and GPipe, 1F1B, ZB-H1 and ``auto`` (``memory_limit=p``
micro-batches in flight per rank: 1F1B's bound) with ``checkpoint="never"``,
so the schedules differ in what they keep, not in recomputation. m =
max(8, 2p) micro-batches; the layers are split evenly over the stages.

(L, D) are searched on a ladder on which both L and D never decrease, so a
larger rung can only need more memory and a bisection (galloping up from
the previous row's answer, :func:`benchmarks.gpu.memory.search`) finds the
largest rung that fits. The model is :func:`benchmarks.gpu.models.amoebanet_d`
(see there how its cells differ from AmoebaNet-D's), its parameter count is
reported beside (L, D).

Targets: pipelining multiplies the trainable size (pipeline-8's best
parameter count over the baseline's >= 2), and 1F1B trains at least as
large a model as GPipe under the same budget for every p (smallest ratio of
parameter counts >= 1).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks.config import RunConfig
from benchmarks.gloo_peers import GlooPeers
from benchmarks.gpu.memory import search
from benchmarks.gpu.models import amoebanet_d, parameter_count
from benchmarks.seed_memory_worker import serve
from benchmarks.table import format_table
from benchmarks.targets import Target

NAME = "seed_memory"
TITLE = "Seed table 2: largest AmoebaNet-D (L, D) whose every rank's real heap peak fits a per-rank budget"
MIB = 2**20
#: the budget is the baseline's measured peak at the calibration rung plus this (the heap varies by a few 100 KiB)
SLACK = 0.02
#: torchgpipe's figures (GPUs, 224 x 224 images): experiment -> (L, D)
SEED = {"baseline": (18, 208), "pipeline-1": (18, 416), "pipeline-2": (18, 544), "pipeline-4": (36, 544),
        "pipeline-8": (72, 512)}
#: ``SEED_MEMORY_RANKS=8`` (comma-separated) measures only these rank counts, after the baseline
RANKS_ENV = "SEED_MEMORY_RANKS"
#: (schedule, checkpoint) rows per rank count, in search order
ROWS = (("gpipe", "except_last"), ("gpipe", "never"), ("1f1b", "never"), ("zb-h1", "never"), ("auto", "never"))


def ladder(level: str) -> list[tuple[int, int]]:
    """A chain of (L, D): both never decrease along it, so memory grows along it."""
    if level == "tiny":
        return [(3, 4), (3, 8), (3, 12), (3, 16), (6, 16)]
    rungs = [(6, d) for d in (16, 24, 32, 40, 48, 56, 64)] + [(12, d) for d in (64, 72, 80, 96)]
    return rungs + [(24, d) for d in (96, 112, 128)] + [(48, 128)]


def chunks_for(p: int) -> int:
    return max(8, 2 * p)


_PARAMS: dict[tuple[int, int], int] = {}


def params(L: int, D: int) -> int:
    """Parameter count of AmoebaNet-D (L, D) for 10 classes, counted on the meta device."""
    if (L, D) not in _PARAMS:
        with torch.device("meta"):
            _PARAMS[L, D] = parameter_count(amoebanet_d(L, D, num_classes=10))
    return _PARAMS[L, D]


def run(cfg: RunConfig) -> dict[str, Any]:
    image, batch = cfg.pick(tiny=(32, 16), quick=(32, 32), full=(32, 32))
    calibration = cfg.pick(tiny=(3, 12), quick=(6, 32), full=(6, 32))
    ranks = cfg.pick(tiny=(2,), quick=(1, 2, 4), full=(1, 2, 4, 8))
    if os.environ.get(RANKS_ENV):  # a part of the table (the baseline still comes first, in the first group)
        ranks = tuple(int(p) for p in os.environ[RANKS_ENV].split(","))
    rows_for = cfg.pick(tiny=ROWS[1:3], quick=ROWS, full=ROWS)
    rungs = ladder(cfg.level)
    base = {"batch": batch, "image": image, "classes": 10}
    results: list[dict[str, Any]] = []
    start, budget = 0, 0

    def find(p: int, group: GlooPeers, schedule: str | None, checkpoint: str, label: str) -> None:
        nonlocal start, budget
        trial = {**base, "schedule": schedule, "checkpoint": checkpoint, "chunks": chunks_for(p) if schedule else 1,
                 "auto_cap": p}
        outs: dict[tuple[int, int], list[dict[str, Any]]] = {}

        def fits(rung: tuple[int, int]) -> bool:
            replies = group.ask("measure", {**trial, "L": rung[0], "D": rung[1]})
            outs[rung] = [replies[r] for r in sorted(replies)]
            return max(o["peak_bytes"] for o in outs[rung]) <= budget

        index, tried, complete = search(rungs, start, lambda i: fits(i), lambda: True)
        best = rungs[index] if index >= 0 else None
        peaks = [o["peak_bytes"] for o in outs[best]][:1 if schedule is None else None] if best else []
        results.append({"experiment": label, "ranks": p if schedule else 1, "schedule": schedule or "-", "checkpoint": checkpoint,
                        "chunks": trial["chunks"], "L": best[0] if best else None, "D": best[1] if best else None,
                        "params": params(*best) if best else 0, "peak_bytes_per_rank": peaks,
                        "tried": {f"{L},{D}": ok for (L, D), ok in tried.items()}, "complete": complete,
                        "top_of_ladder": index == len(rungs) - 1})
        cfg.log(f"{label} {schedule or 'plain'}/{checkpoint}: {best} "
                + " ".join(f"({L},{D}){'' if ok else 'x'}" for (L, D), ok in sorted(tried.items())))
        start = max(index, 0)

    for p in ranks:
        with GlooPeers({}, world=p, timeout=900.0, target=serve) as group:
            # the first trial of a process pays one-time allocations (imports, gloo, kernels): not a rank's memory
            for warm_up in (None, "gpipe"):
                group.ask("measure", {**base, "L": rungs[0][0], "D": rungs[0][1], "schedule": warm_up,
                                      "checkpoint": "never", "chunks": chunks_for(p), "auto_cap": p})
            if not results:  # the baseline runs on rank 0 of the first group
                replies = group.ask("measure", {**base, "L": calibration[0], "D": calibration[1], "schedule": None,
                                                "checkpoint": "never", "chunks": 1, "auto_cap": 1})
                budget = int(replies[0]["peak_bytes"] * (1 + SLACK))
                cfg.log(f"budget: the baseline's peak at {calibration} + {SLACK:.0%} = {budget / MIB:.1f} MiB")
                find(p, group, None, "never", "baseline")
            for schedule, checkpoint in rows_for:
                find(p, group, schedule, checkpoint, f"pipeline-{p}")
    return _report(cfg, results, budget, image, batch, rungs)


def _report(cfg: RunConfig, results: list[dict[str, Any]], budget: int, image: int, batch: int,
            rungs: list[tuple[int, int]]) -> dict[str, Any]:
    table_rows = []
    for r in results:
        seed = SEED.get(r["experiment"])
        largest = f"({r['L']}, {r['D']})" if r["L"] else "none fits"
        if r["top_of_ladder"]:
            largest += " (ladder top)"
        peaks = r["peak_bytes_per_rank"]
        table_rows.append([r["experiment"], r["schedule"], r["checkpoint"], r["chunks"], largest,
                           f"{r['params'] / 1e6:.2f}", f"{max(peaks) / MIB:.1f}" if peaks else "-",
                           "/".join(f"{b / MIB:.0f}" for b in peaks) or "-",
                           f"({seed[0]}, {seed[1]})" if seed and r["schedule"] in ("-", "gpipe")
                           and r["checkpoint"] != "never" or (seed and r["experiment"] == "baseline") else ""])
    table = format_table(["experiment", "schedule", "ckpt", "m", "largest (L, D)", "params (M)", "max rank peak MiB",
                          "per-rank peak MiB", "seed (GPU)"], table_rows, title=TITLE)
    table += (
        f"\nbudget {budget / MIB:.0f} MiB per rank (glibc heap in use above the level before the model was built, peak "
        f"over one SGD training step after a warm-up step; one process per rank); batch {batch} images "
        f"3x{image}x{image}, 10 classes, float32; ladder {rungs[0]} .. {rungs[-1]} ({len(rungs)} rungs)."
        "\nseed (GPU): torchgpipe, 224x224 ImageNet-sized input on GPUs of one size, checkpointing on."
    )

    def best(label: str, schedule: str, checkpoint: str = "never") -> int:
        return next((r["params"] for r in results if r["experiment"] == label and r["schedule"] == schedule
                     and r["checkpoint"] == checkpoint), 0)

    baseline = next(r["params"] for r in results if r["experiment"] == "baseline")
    top = max(int(r["experiment"].split("-")[1]) for r in results if r["experiment"] != "baseline")
    biggest = max(r["params"] for r in results if r["experiment"] == f"pipeline-{top}")
    ratios = [best(f"pipeline-{p}", "1f1b") / max(best(f"pipeline-{p}", "gpipe"), 1)
              for p in sorted({r["ranks"] for r in results if r["experiment"] != "baseline"})
              if best(f"pipeline-{p}", "1f1b") and best(f"pipeline-{p}", "gpipe")]
    targets = [Target(f"pipeline-{top} best params / baseline params", biggest / max(baseline, 1), 2.0),
               Target("1F1B params / GPipe params (checkpoint never), smallest over p",
                      min(ratios) if ratios else 0.0, 1.0)]
    return {"title": TITLE, "table": table, "targets": targets, "budget_bytes": budget,
            "workload": {"batch": batch, "image": image, "classes": 10, "ladder": rungs}, "rows": results}
