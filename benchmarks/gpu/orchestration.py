"""Item 5: orchestration efficiency with real kernels (a GPT-like model, bf16 autocast, ranks on one GPU).

For p = 4 and 2 ranks, m = 8, 32, 16 micro-batches (that order, so the
extremes come first when time is short) and every schedule that fits p:

* replay ÷ measured: the simulator's replay of the plan on the step's own
  task records (CUDA-event device times, ``StepReport.tasks``) ÷ the step's
  wall clock (synchronised before and after). 1.0 means the engine adds
  nothing between tasks; target ≥ 0.95;
* step time vs naive: the plain model on the whole batch, same device, same
  autocast, timed the same way (naive ÷ pipeline: > 1 is faster than naive);
* host overhead per task: (wall − replay) ÷ the most tasks any rank runs;
* fixed cost per step: wall − the report's makespan (first task start to
  last task end).

The micro-batch is fixed (2 sequences of 1024 tokens) and m varies, so
every task is the same size and larger m means a larger batch. Stages are
balanced by measured layer times; ``checkpoint="never"``. All ranks share
one GPU, so their kernels contend: a task's device time includes the
slow-down from the other ranks' concurrent kernels, and the replay assumes
those measured durations.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from benchmarks.gpu.budget import ItemBudget
from benchmarks.gpu.env import Env, contiguous_partition, layer_costs, schedules
from benchmarks.gpu.models import gpt, parameter_count
from benchmarks.gpu.results import ItemResult, Results
from pipesched import Pipeline, simulate

NAME = "orchestration"
TITLE = "5. Orchestration efficiency: GPT-like model, bf16 autocast, ranks sharing one GPU"
COLUMNS = [("p", "p"), ("m", "m"), ("schedule", "schedule"), ("stages", "stages"), ("tasks_per_rank", "tasks/rank"),
           ("step_ms", "step ms"), ("naive_ms", "naive ms"), ("naive_over_step", "naive/step"),
           ("replay_over_measured", "replay/measured"), ("overhead_us_per_task", "host µs/task"),
           ("fixed_ms", "fixed ms/step"), ("steps", "steps")]
PRIORITY = ("1f1b", "gpipe", "zb-h1", "zb-v", "interleaved-1f1b", "dualpipe-v", "interleaved-zb", "looped-bfs")


def sizes(env: Env) -> dict[str, Any]:
    if env.dry_run:
        return {"vocab": 64, "width": 32, "heads": 2, "blocks": 8, "seq": 16, "rows": 1, "grid": [(4, 4)], "steps": 1}
    return {"vocab": 8192, "width": 2048, "heads": 16, "blocks": 8, "seq": 1024, "rows": 2,
            "grid": [(4, 8), (4, 32), (2, 8), (2, 32), (4, 16), (2, 16)], "steps": 3}


def _tokens(env: Env, rows: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=env.device).manual_seed(0)
    tokens = torch.randint(0, vocab, (rows, seq + 1), device=env.device, generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def run(env: Env, results: Results, budget: ItemBudget) -> ItemResult:
    item = results.add_item(NAME, TITLE, COLUMNS)
    size = sizes(env)
    torch.manual_seed(0)
    model = gpt(size["vocab"], size["width"], size["heads"], size["blocks"], size["seq"]).to(env.device)
    loss_fn = nn.CrossEntropyLoss()
    item.extra.update(parameters=parameter_count(model), sizes=size)
    sample, _ = _tokens(env, size["rows"], size["seq"], size["vocab"])
    costs = layer_costs(env, model, sample, autocast=torch.bfloat16)
    item.extra["layer_costs_s"] = costs
    estimate = 1.0  # seconds per step, updated as measured
    for p, m in size["grid"]:
        x, y = _tokens(env, m * size["rows"], size["seq"], size["vocab"])
        order = schedules(env, p, PRIORITY)
        if item.rows and not budget.fits(estimate * (size["steps"] + 1) * 2):  # the first runs regardless
            results.skip(item, f"p={p} m={m}", f"item budget ({budget.left():.0f} s left)")
            continue

        env.timed(_naive, env, model, loss_fn, x, y)
        naive_s = statistics.median(env.timed(_naive, env, model, loss_fn, x, y)[0] for _ in range(size["steps"]))
        estimate = max(estimate, naive_s)
        for schedule, stages in order:
            if item.rows and not budget.fits(estimate * (size["steps"] + 1)):
                results.skip(item, f"p={p} m={m} {schedule}", f"item budget ({budget.left():.0f} s left)")
                continue
            row = _one(env, model, loss_fn, x, y, p, m, schedule, stages, costs, size["steps"])
            estimate = max(estimate, row["step_ms"] / 1e3)
            results.row(item, **row, naive_ms=naive_s * 1e3, naive_over_step=naive_s / (row["step_ms"] / 1e3))
        model.zero_grad(set_to_none=True)
        env.free()
    return item


def _naive(env: Env, model: nn.Sequential, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The plain model on the whole batch, under the same autocast."""
    model.zero_grad(set_to_none=True)
    with env.autocast(torch.bfloat16):
        loss = loss_fn(model(x), y)
    loss.backward()


def _one(env: Env, model: nn.Sequential, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, p: int, m: int,
         schedule: str, stages: int, costs: list[float], steps: int) -> dict[str, Any]:
    balance = contiguous_partition(costs, stages)
    with Pipeline(model, schedule=schedule, balance=balance, devices=[env.device] * p, chunks=m,
                  checkpoint="never", loss_fn=loss_fn) as pipe:
        plan = pipe.schedule.plan(stages, m, p)
        tasks = max(len(actions) for actions in plan)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with env.autocast(torch.bfloat16):
                pipe.step(x, y)

        env.timed(step)  # warm-up: threads, streams, allocator
        walls, replays, spans = [], [], []
        for _ in range(steps):
            wall, _ = env.timed(step)
            report = pipe.last_report
            walls.append(wall)
            replays.append(simulate(plan, report.tasks).makespan)
            spans.append(report.makespan)
    model.zero_grad(set_to_none=True)
    wall = statistics.median(walls)
    return {
        "p": p, "m": m, "schedule": schedule, "stages": stages, "balance": balance, "tasks_per_rank": tasks,
        "step_ms": wall * 1e3, "steps": len(walls),
        "replay_over_measured": statistics.median(r / w for r, w in zip(replays, walls)),
        "overhead_us_per_task": statistics.median((w - r) / tasks * 1e6 for r, w in zip(replays, walls)),
        "fixed_ms": statistics.median((w - s) * 1e3 for s, w in zip(spans, walls)),
        "step_s": walls, "replay_s": replays, "makespan_s": spans,
    }
