"""7. Real memory: the C heap's peak during a step, against pipesched's activation meter.

Benchmark 6 checks the meter against a count of what the stages keep. This
one checks the meter, and the schedules' memory bounds, against the bytes the
process really holds: glibc's heap in use (:mod:`benchmarks.heap`, sampled by a
probe after every stage's forward, when each stage's gradient arrives, and by
a background thread), as its peak above the level just before the step.

Workload: p = 4 CPU ranks; every stage is ``x * w1 * w2`` (two
:class:`Scale` layers) on 256 KiB boundaries (64 rows × 512 float64 per
micro-batch), so boundary-sized tensors dominate everything else a step
allocates. A kept forward holds 2 boundaries (its input and the intermediate
``x * w1``, both saved by autograd), a checkpointed one holds 1 (its input).
GPipe and 1F1B cut the model into 4 stages, interleaved 1F1B into 8 (2 per
rank, so it runs twice the work and twice the boundaries). m = 8, 16, 32,
checkpointing ``never`` and ``always``.

Per schedule, policy and m the table gives the real peak (median [min..max]
over rounds; the order of the schedules rotates every round) in MiB and in
boundaries, the meter's ``last_report.peak_activation_bytes`` summed over the
ranks, and real ÷ meter.

What the meter counts: per rank, the distinct tensors autograd saves for
backward, other than the stage's parameters and buffers, plus the stage
inputs kept for backward (for a checkpointed forward: only the input; during
its backward, the recompute's tensors too), and its peak over the step. What
it does not count, and why real ÷ meter is not 1:

* boundary tensors in transit (sent, not yet read, and the incoming gradient
  a backward is working with), gradients of parameters and inputs,
  optimizer state, and temporaries inside a running task (e.g. the loss's
  difference tensor, a backward's intermediate gradients): real > meter;
* the per-rank peaks happen at different moments, so their sum is an upper
  bound of the peak of the sum: real < meter;
* views of the caller's batch (the first stage's input, the last stage's
  targets, which ``MSELoss`` saves) count in the meter without being new
  bytes: real < meter.

Targets (issue 9): 1F1B's real peak is below GPipe's at the largest m, and
1F1B's real peak does not grow with m (m = 32 ÷ m = 8 < 1.25).
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from benchmarks.config import RunConfig
from benchmarks.heap import HeapPeak, available, probe
from benchmarks.stats import fmt, summary
from benchmarks.table import format_table
from benchmarks.targets import Target
from pipesched import Pipeline

NAME = "real_memory"
TITLE = "7. Real heap peak per step (glibc mallinfo2) vs the activation meter (p=4, boundary-sized activations)"
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
POLICIES = ("never", "always")
RANKS = 4
MIB = 1024 * 1024


class Scale(nn.Module):
    """``x * w``: autograd saves the input (one boundary) and the parameter (not an activation)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def _stages(schedule: str) -> int:
    return 2 * RANKS if schedule.startswith("interleaved") else RANKS


def _model(schedule: str, width: int, meter: HeapPeak) -> nn.Sequential:
    """One stage = ``Scale, Scale`` then a heap probe; cut with ``balance=[2] * stages``."""
    return nn.Sequential(*probe([nn.Sequential(Scale(width), Scale(width)) for _ in range(_stages(schedule))], meter))


def run(cfg: RunConfig) -> dict[str, Any]:
    if not available():
        raise RuntimeError("benchmark real_memory needs glibc >= 2.33 (mallinfo2) to read the heap")
    rows_per_mb, width = cfg.pick(tiny=(8, 64), quick=(64, 512), full=(64, 512))
    counts = cfg.pick(tiny=[4, 8], quick=[8, 16, 32], full=[8, 16, 32])
    rounds = cfg.n_rounds(tiny=1, quick=3, full=5)
    boundary = rows_per_mb * width * 8
    combos = [(s, c) for s in SCHEDULES for c in POLICIES]
    rows: list[dict[str, Any]] = []
    for m in counts:
        x = torch.randn(rows_per_mb * m, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        y = torch.zeros_like(x)
        meters = {combo: HeapPeak() for combo in combos}
        pipes = {
            (schedule, policy): Pipeline(
                _model(schedule, width, meters[(schedule, policy)]), schedule=schedule,
                balance=[2] * _stages(schedule), devices=["cpu"] * RANKS, chunks=m, checkpoint=policy,
                loss_fn=nn.MSELoss(),
            )
            for schedule, policy in combos
        }
        real: dict[tuple[str, str], list[int]] = {combo: [] for combo in combos}
        metered: dict[tuple[str, str], list[list[int]]] = {combo: [] for combo in combos}
        try:
            for pipe in pipes.values():
                pipe.step(x, y)  # warm-up: gradients exist, worker arenas, first-call allocations
            for r in range(rounds):
                order = combos[r % len(combos):] + combos[:r % len(combos)]
                # one collection per round, none during it: a collection inside a step would
                # lower the heap under the meter's feet (and a full one costs 0.2 s here)
                gc.collect()
                gc.disable()
                try:
                    for combo in order:
                        pipe, meter = pipes[combo], meters[combo]
                        with meter:
                            pipe.step(x, y)
                        real[combo].append(meter.above_base)
                        metered[combo].append(list(pipe.last_report.peak_activation_bytes))  # type: ignore[union-attr]
                finally:
                    gc.enable()
        finally:
            for pipe in pipes.values():
                pipe.close()
        for schedule, policy in combos:
            combo = (schedule, policy)
            sums = [sum(per_rank) for per_rank in metered[combo]]
            rows.append({
                "schedule": schedule, "checkpoint": policy, "microbatches": m, "stages": _stages(schedule),
                "real_bytes": real[combo], "meter_bytes_per_rank": metered[combo], "meter_bytes_sum": sums,
                "real_over_meter": summary([a / b for a, b in zip(real[combo], sums)]),
            })
        cfg.log(f"m={m}: " + ", ".join(
            f"{row['schedule']}/{row['checkpoint']} {summary(row['real_bytes'])['median'] / boundary:.1f}"
            for row in rows[-len(combos):]) + " boundaries")

    def find(schedule: str, policy: str, m: int) -> dict[str, Any]:
        return next(r for r in rows if (r["schedule"], r["checkpoint"], r["microbatches"]) == (schedule, policy, m))

    table_rows = []
    for row in sorted(rows, key=lambda r: (SCHEDULES.index(r["schedule"]), POLICIES.index(r["checkpoint"]),
                                           r["microbatches"])):
        real_s, meter_s = summary(row["real_bytes"]), summary(row["meter_bytes_sum"])
        per_rank = row["meter_bytes_per_rank"][-1]
        table_rows.append([
            row["schedule"], row["checkpoint"], row["microbatches"],
            fmt(real_s, 1, 1 / MIB), f"{real_s['median'] / boundary:.1f}",
            f"{meter_s['median'] / MIB:.1f}", f"{meter_s['median'] / boundary:.1f}",
            "/".join(f"{b / boundary:.0f}" for b in per_rank),
            fmt(row["real_over_meter"]),
        ])
    table = format_table(
        ["schedule", "ckpt", "m", "real peak MiB", "real (boundaries)", "meter sum MiB", "meter (boundaries)",
         "meter per rank (boundaries)", "real/meter"],
        table_rows, title=TITLE,
    )
    table += (
        f"\nreal peak: heap in use above its level before the step, median [min..max] over {rounds} round(s); "
        f"boundary = {rows_per_mb} x {width} float64 = {boundary / 1024:.0f} KiB."
        "\nmeter: pipe.last_report.peak_activation_bytes summed over the 4 ranks (saved-for-backward + kept inputs; "
        "not transfers in transit, gradients, temporaries; views of the caller's batch count without new bytes)."
        "\nEach stage is x * w1 * w2: a kept forward holds 2 boundaries, a checkpointed one 1. Interleaved: 8 stages, "
        "2 per rank."
    )
    largest, smallest = max(counts), min(counts)
    median = lambda schedule, m: float(summary(find(schedule, "never", m)["real_bytes"])["median"])  # noqa: E731
    targets = [
        Target(f"real peak 1F1B / GPipe at m={largest} (checkpoint never)",
               median("1f1b", largest) / median("gpipe", largest), 1.0, higher_is_better=False,
               note=f"{median('1f1b', largest) / boundary:.1f} vs {median('gpipe', largest) / boundary:.1f} boundaries"),
        Target(f"real peak 1F1B m={largest} / m={smallest} (checkpoint never)",
               median("1f1b", largest) / median("1f1b", smallest), 1.25, higher_is_better=False),
    ]
    return {
        "title": TITLE,
        "table": table,
        "targets": targets,
        "workload": {"ranks": RANKS, "rows_per_microbatch": rows_per_mb, "width": width, "dtype": "float64",
                     "boundary_bytes": boundary, "microbatches": counts, "rounds": rounds,
                     "stage": "Scale(width), Scale(width), HeapProbe"},
        "rows": rows,
    }
