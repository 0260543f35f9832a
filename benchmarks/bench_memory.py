"""6. Memory: peak activation bytes per rank, measured against theory; the largest model under a budget.

Part A. p = 4 CPU ranks, a residual MLP cut into 4 stages (GPipe, 1F1B) or 8
(interleaved, 2 per rank), micro-batches of a fixed size, m = 4..32,
checkpointing ``never`` and ``always``. Measured: ``pipe.last_report.
peak_activation_bytes`` per rank. Theory: each stage's bytes for one
micro-batch, counted outside the engine on the bare stage module
(:mod:`benchmarks.activation_meter`), times what the schedule's plan keeps in
flight: walking each rank's actions in order, a kept forward adds the stage's
bytes, a checkpointed one only its input (plus, during its backward, the
recompute). In closed form without checkpointing: GPipe holds m micro-batches
on every rank (∝ m), 1F1B holds min(p − rank, m) (∝ p − rank, independent of
m). The table prints measured ÷ theory per rank.

Part B. Under a fixed activation budget per rank, the largest residual MLP
(blocks × width, by parameter count) whose step stays within it, per schedule
and checkpoint policy, searched over a small grid (for each width, blocks
grow until the budget is exceeded). Parameters and gradients are not
activations and do not count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.activation_meter import StageBytes, plan_peak, stage_bytes
from benchmarks.config import RunConfig
from benchmarks.table import format_table
from benchmarks.targets import Target
from pipesched import Pipeline
from pipesched.cli.models import residual_mlp, synthetic_classification

NAME = "memory"
TITLE = "6. Peak activation bytes per rank vs theory (p=4), and the largest model under a budget"
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
POLICIES = ("never", "always")
RANKS = 4


def _units(pipe: Pipeline, x_mb: torch.Tensor, y_mb: torch.Tensor) -> dict[int, StageBytes]:
    criterion = nn.CrossEntropyLoss()
    units, h = {}, x_mb
    for s, stage in enumerate(pipe.stages):
        last = s == len(pipe.stages) - 1
        units[s], h = stage_bytes(stage, h, input_requires_grad=s > 0,
                                  loss=(lambda out: criterion(out, y_mb)) if last else None)
    return units


def block_balance(blocks: int, stages: int) -> list[int]:
    """Blocks split evenly over the stages; the input layer joins the first, norm and head the last.

    Equal blocks per stage make per-stage activation bytes nearly equal, so the
    per-rank figures show the schedule's shape (m, or p - rank) directly.
    """
    if blocks < stages:
        raise ValueError(f"{blocks} blocks cannot fill {stages} stages")
    balance = [blocks // stages + (1 if s < blocks % stages else 0) for s in range(stages)]
    balance[0] += 1
    balance[-1] += 2
    return balance


def _stages(schedule: str) -> int:
    return 2 * RANKS if schedule.startswith("interleaved") else RANKS


def closed_form(schedule: str, m: int, rank: int, p: int) -> str:
    if schedule == "gpipe":
        return str(m)
    if schedule == "1f1b":
        return str(min(p - rank, m))
    return "-"


def _slash(values: list[Any]) -> str:
    return "/".join(str(v) for v in values)


def part_a(cfg: RunConfig) -> tuple[list[dict[str, Any]], list[list[object]]]:
    width, blocks, rows_per_mb = cfg.pick(tiny=(16, 8, 2), quick=(128, 8, 8), full=(256, 8, 8))
    counts = cfg.pick(tiny=[4], quick=[4, 8, 16], full=[4, 8, 16, 32])
    torch.manual_seed(0)
    model = residual_mlp(32, width, blocks)
    rows, table = [], []
    for schedule in SCHEDULES:
        for policy in POLICIES:
            for m in counts:
                x, y = synthetic_classification(rows_per_mb * m, seed=2)
                with Pipeline(model, schedule=schedule, devices=["cpu"] * RANKS, chunks=m, checkpoint=policy,
                              balance=block_balance(blocks, _stages(schedule)),
                              loss_fn=nn.CrossEntropyLoss()) as pipe:
                    model.zero_grad(set_to_none=True)
                    pipe.step(x, y)
                    report = pipe.last_report
                    units = _units(pipe, x[:rows_per_mb], y[:rows_per_mb])
                    plan = pipe.schedule.plan(pipe.num_stages, m, RANKS)
                    theory = [plan_peak(row, units, policy == "always") for row in plan]
                    measured = list(report.peak_activation_bytes)
                    ratios = [a / b if b else float("nan") for a, b in zip(measured, theory)]
                    rows.append({
                        "schedule": schedule, "checkpoint": policy, "microbatches": m, "balance": pipe.balance,
                        "measured_bytes": measured, "theory_bytes": theory, "ratio": ratios,
                        "peak_inflight": list(report.peak_inflight),
                        "stage_bytes": {s: {"input": u.input, "total": u.total} for s, u in units.items()},
                    })
                    table.append([
                        schedule, policy, m,
                        _slash([f"{b / 1024:.0f}" for b in measured]),
                        _slash([f"{b / 1024:.0f}" for b in theory]),
                        f"{min(ratios):.3f}..{max(ratios):.3f}",
                        _slash(report.peak_inflight),
                        _slash([closed_form(schedule, m, r, RANKS) for r in range(RANKS)]) if policy == "never" and schedule != "interleaved-1f1b" else "-",
                    ])
    return rows, table


def part_b(cfg: RunConfig) -> tuple[dict[str, Any], list[list[object]]]:
    budget = cfg.pick(tiny=64 * 1024, quick=256 * 1024, full=512 * 1024)
    widths = cfg.pick(tiny=[16], quick=[128, 256], full=[128, 256, 512])
    block_counts = cfg.pick(tiny=[8], quick=[8, 16, 32], full=[8, 16, 32, 64])
    m, rows_per_mb = 8, 4
    x, y = synthetic_classification(m * rows_per_mb, seed=3)
    found, table = {}, []
    for schedule in SCHEDULES:
        for policy in POLICIES:
            tried, best = [], None
            for width in widths:
                for blocks in block_counts:
                    torch.manual_seed(0)
                    model = residual_mlp(32, width, blocks)
                    params = sum(p.numel() for p in model.parameters())
                    with Pipeline(model, schedule=schedule, devices=["cpu"] * RANKS, chunks=m,
                                  balance=block_balance(blocks, _stages(schedule)),
                                  checkpoint=policy, loss_fn=nn.CrossEntropyLoss()) as pipe:
                        pipe.step(x, y)
                        peak = max(pipe.last_report.peak_activation_bytes)
                    fits = peak <= budget
                    tried.append({"blocks": blocks, "width": width, "params": params, "peak_bytes": peak, "fits": fits})
                    if fits and (best is None or params > best["params"]):
                        best = tried[-1]
                    if not fits:
                        break  # more blocks only hold more
                if tried and not tried[-1]["fits"] and tried[-1]["blocks"] == block_counts[0]:
                    break  # the fewest blocks at this width overflow: wider models do too
            capped = best is not None and best["blocks"] == block_counts[-1] and best["width"] == widths[-1]
            found[f"{schedule}/{policy}"] = {"best": best, "tried": tried, "grid_cap": capped}
            table.append([
                schedule, policy,
                "none fits" if best is None else f"{best['blocks']} x {best['width']}" + (" (grid cap)" if capped else ""),
                "-" if best is None else f"{best['params'] / 1e6:.2f}",
                "-" if best is None else f"{best['peak_bytes'] / 1024:.0f}",
                len(tried),
            ])
    meta = {"budget_bytes": budget, "widths": widths, "blocks": block_counts, "microbatches": m,
            "rows_per_microbatch": rows_per_mb, "ranks": RANKS}
    return {"search": found, **meta}, table


def run(cfg: RunConfig) -> dict[str, Any]:
    rows_a, table_a = part_a(cfg)
    headers_a = ["schedule", "ckpt", "m", "peak KiB r0/r1/r2/r3", "theory KiB", "measured/theory",
                 "in flight (measured)", "closed form"]
    table = format_table(headers_a, table_a, title=TITLE + "\nA. peak activation bytes per rank (measured vs theory)")
    table += "\ntheory: per-stage bytes of one micro-batch measured on the bare stage x what the plan keeps in flight; " \
             "closed form (never): GPipe m, 1F1B min(p - rank, m)"
    search, table_b = part_b(cfg)
    table += "\n\n" + format_table(
        ["schedule", "ckpt", "largest blocks x width", "params (M)", "peak KiB (max rank)", "steps tried"], table_b,
        title=(f"B. largest residual MLP under {search['budget_bytes'] / 1024:.0f} KiB of activations per rank "
               f"(p={RANKS}, m={search['microbatches']}, {search['rows_per_microbatch']} rows per micro-batch; "
               f"widths {search['widths']}, blocks {search['blocks']})"),
    )
    worst = max(abs(r - 1.0) for row in rows_a for r in row["ratio"])
    targets = [Target("measured/theory peak activation bytes, worst |ratio - 1| over all rows and ranks",
                      worst, 0.05, higher_is_better=False)]
    return {"title": TITLE, "table": table, "targets": targets, "part_a": rows_a, "part_b": search}
