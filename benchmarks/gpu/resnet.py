"""Item 3, seed table 1: ResNet-101 speed, naive-1 vs pipeline-1 (checkpointing) vs pipeline-2/4 on one GPU.

torchgpipe's speed benchmark, on our own ResNet-101 ``nn.Sequential``
(:mod:`benchmarks.gpu.models`; cross-checked against torchvision's where it
is importable): 3 x 224 x 224 inputs, labels in 0..9, float32 with PyTorch's
default TF32 settings, ``cudnn.benchmark`` on.

* naive-1: the plain model, batch 96, one forward and backward;
* pipeline-1: ``Pipeline`` with one rank, ``chunks=1``, ``checkpoint="always"``
  (torchgpipe's pipeline-1), and the same with ``checkpoint="never"`` (the
  engine's own cost, no recompute). Measured side by side with naive-1 in
  alternating rounds; the figure is naive time ÷ pipeline time per round,
  median (torchgpipe: 0.74 on P40s; target ≥ 0.80);
* pipeline-2/4: 2 or 4 ranks *on the same GPU* (their streams run
  concurrently), stages balanced by measured layer times, batch 1024 in 64
  micro-batches (torchgpipe's micro-batch of 16), ``checkpoint="except_last"``;
  GPipe, then 1F1B, then torchgpipe's batch 4096 in 256 if time is left.
  Speed-up = samples/s ÷ naive-1's samples/s. On one device this measures
  what overlapping ranks' kernels buys against one stream's idle gaps, not
  what more devices would give: the GPU's arithmetic is shared.

Both sides start each step from ``grad = None`` and run no optimizer step.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.gpu.budget import ItemBudget
from benchmarks.gpu.env import Env, contiguous_partition, layer_costs
from benchmarks.gpu.models import cross_check_resnet101, parameter_count, resnet101
from benchmarks.gpu.results import ItemResult, Results
from pipesched import Pipeline

NAME = "resnet"
TITLE = "3. ResNet-101 speed on one GPU: naive-1 vs pipeline-k (torchgpipe's speed benchmark)"
COLUMNS = [("experiment", "experiment"), ("schedule", "schedule"), ("checkpoint", "checkpoint"),
           ("batch", "batch"), ("chunks", "chunks"), ("balance", "balance"), ("step_ms", "step ms (median)"),
           ("samples_per_s", "samples/s"), ("speedup", "vs naive-1"), ("rounds", "rounds")]


def sizes(env: Env) -> dict[str, Any]:
    if env.dry_run:
        return {"width": 8, "blocks": (1, 1, 1, 1), "image": 16, "batch": 8, "big": (16, 8), "bigger": (32, 16),
                "rounds": 2, "steps": 1}
    return {"width": 64, "blocks": (3, 4, 23, 3), "image": 224, "batch": 96, "big": (1024, 64),
            "bigger": (4096, 256), "rounds": 15, "steps": 3}


def _step(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    def naive() -> object:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    return naive


def _pipe_step(pipe: Pipeline, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    def step() -> object:
        model.zero_grad(set_to_none=True)
        return pipe.step(x, y)
    return step


def run(env: Env, results: Results, budget: ItemBudget) -> ItemResult:
    item = results.add_item(NAME, TITLE, COLUMNS)
    size = sizes(env)
    cross = cross_check_resnet101(env.device) if env.cuda else {"status": "skipped", "reason": "dry run"}
    item.extra["cross_check"] = cross
    results.note(item, f"cross-check against torchvision.models.resnet101: {cross}")
    if cross["status"] == "mismatch":
        results.fail(item, f"our ResNet-101 differs from torchvision's: {cross}")
    saved_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        _measure(env, results, item, budget, size)
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
    return item


def _batch(env: Env, rows: int, image: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=env.device).manual_seed(0)
    return (torch.randn(rows, 3, image, image, device=env.device, generator=g),
            torch.randint(0, 10, (rows,), device=env.device, generator=g))


def _measure(env: Env, results: Results, item: ItemResult, budget: ItemBudget, size: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = resnet101(width=size["width"], blocks=size["blocks"]).to(env.device)
    item.extra["parameters"] = parameter_count(model)
    item.extra["layers"] = len(model)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _batch(env, size["batch"], size["image"])
    layers = len(model)
    contenders: dict[str, Callable[[], object]] = {"naive-1": _step(model, loss_fn, x, y)}
    pipes = {
        "pipeline-1": Pipeline(model, schedule="gpipe", balance=[layers], devices=[env.device], chunks=1,
                               checkpoint="always", loss_fn=loss_fn),
        "pipeline-1 (no checkpoint)": Pipeline(model, schedule="gpipe", balance=[layers], devices=[env.device],
                                               chunks=1, checkpoint="never", loss_fn=loss_fn),
    }
    contenders.update({name: _pipe_step(pipe, model, x, y) for name, pipe in pipes.items()})
    try:
        times = _alternate(env, contenders, size["rounds"], budget, share=0.4)
    finally:
        for pipe in pipes.values():
            pipe.close()
    naive = statistics.median(times["naive-1"])
    naive_rate = size["batch"] / naive
    for name, seconds in times.items():
        ratio = [n / s for n, s in zip(times["naive-1"], seconds)]
        checkpoint = {"naive-1": "-", "pipeline-1": "always"}.get(name, "never")
        results.row(item, experiment=name, schedule="-" if name == "naive-1" else "gpipe", checkpoint=checkpoint,
                    batch=size["batch"], chunks=1, balance=f"[{layers}]", step_ms=statistics.median(seconds) * 1e3,
                    samples_per_s=size["batch"] / statistics.median(seconds), speedup=statistics.median(ratio),
                    rounds=len(seconds), ratio_per_round=ratio, step_s=seconds)
    item.extra["pipeline1_over_naive1"] = statistics.median(
        [n / s for n, s in zip(times["naive-1"], times["pipeline-1"])])
    results.note(item, f"pipeline-1 / naive-1 (speed, median of per-round ratios): "
                       f"{item.extra['pipeline1_over_naive1']:.3f} (torchgpipe on P40s: 0.74; target >= 0.80)")
    _pipeline_k(env, results, item, budget, model, loss_fn, size, naive_rate)


def _alternate(env: Env, contenders: dict[str, Callable[[], object]], rounds: int, budget: ItemBudget,
               share: float) -> dict[str, list[float]]:
    """Warm each up twice, then rounds in rotating order until ``rounds`` or ``share`` of the item budget."""
    for fn in contenders.values():
        for _ in range(2):
            env.timed(fn)
    names = list(contenders)
    stop_at = budget.left() * (1 - share)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        last = 0.0
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            seconds, _ = env.timed(contenders[name])
            times[name].append(seconds)
            last += seconds
        if budget.left() - last < stop_at:
            break
    return times


def _pipeline_k(env: Env, results: Results, item: ItemResult, budget: ItemBudget, model: nn.Module,
                loss_fn: nn.Module, size: dict[str, Any], naive_rate: float) -> None:
    big, chunks = size["big"]
    bigger, more_chunks = size["bigger"]
    configs = [(2, "gpipe", big, chunks), (4, "gpipe", big, chunks), (2, "1f1b", big, chunks),
               (4, "1f1b", big, chunks), (2, "gpipe", bigger, more_chunks), (4, "gpipe", bigger, more_chunks)]
    sample, _ = _batch(env, big // chunks, size["image"])
    costs = layer_costs(env, model, sample)
    item.extra["layer_costs_s"] = costs
    per_sample = 3.0 / naive_rate  # a pessimistic first guess: 3x naive-1's time per sample
    done = 0
    for p, schedule, batch, m in configs:
        label = f"pipeline-{p} {schedule} batch {batch}/{m}"
        estimate = per_sample * batch * 4  # warm-up (cudnn autotuning) + up to 3 steps
        if done and not budget.fits(estimate):  # the first runs whatever the budget
            results.skip(item, label, f"~{estimate:.0f} s needed, {budget.left():.0f} s left in the item")
            continue
        balance = contiguous_partition(costs, p)
        x, y = _batch(env, batch, size["image"])
        env.free()
        try:
            with Pipeline(model, schedule=schedule, balance=balance, devices=[env.device] * p, chunks=m,
                          checkpoint="except_last", loss_fn=loss_fn) as pipe:
                step = _pipe_step(pipe, model, x, y)
                first, _ = env.timed(step)
                steps = []
                while len(steps) < size["steps"] and (not (steps or done) or budget.fits(max([first, *steps]))):
                    steps.append(env.timed(step)[0])
        except Exception as error:  # out of memory: reported as skipped; anything else is raised
            if not env.is_oom(error):
                raise
            results.skip(item, label, f"out of memory ({str(error).splitlines()[0][:120]})")
            continue
        finally:
            del x, y
            model.zero_grad(set_to_none=True)
        if not steps:
            results.skip(item, label, f"only the warm-up step fitted ({first:.1f} s)")
            continue
        done += 1
        median = statistics.median(steps)
        per_sample = median / batch
        results.row(item, experiment=f"pipeline-{p}", schedule=schedule, checkpoint="except_last", batch=batch,
                    chunks=m, balance=str(balance), step_ms=median * 1e3, samples_per_s=batch / median,
                    speedup=batch / median / naive_rate, rounds=len(steps), step_s=steps, warmup_s=first)
