"""Item 4, seed table 2: AmoebaNet-D (L, D) memory per schedule, and the largest L under a memory cap.

Part A, the seed table's configurations: (L, D) = (6, 208) naive-1, (6, 416)
pipeline-1, (6, 544) pipeline-2, (12, 544) pipeline-4, (24, 512) pipeline-8,
each under every schedule that fits its rank count, ``checkpoint="never"``:
``torch.cuda.max_memory_allocated`` over one step (absolute, and above what
was allocated before the step: parameters and the batch) and the meter's
per-rank peak activation bytes (``StepReport.peak_activation_bytes``).

Part B, the point to show: the largest L (D fixed) that trains one step
under a cap on this process's CUDA memory
(``torch.cuda.set_per_process_memory_fraction``, default 24 GB: a P40), per
rank count p = 4, 8, 2, 1 and schedule, ``checkpoint="never"``, by a bounded
search over a ladder of L values (a few steps per pair, starting from what
the previous schedule found). All p ranks share the one GPU, so the cap
bounds their *sum*, not each rank as p P40s would: a schedule's advantage
here is its total in-flight activations (GPipe: m micro-batches on every
stage; 1F1B: p - r on rank r).

Batch 32 images of 3 x 224 x 224 in ``max(8, 2p)`` micro-batches; no
optimizer state. The stand-in's parameter count differs from AmoebaNet-D's
at the same (L, D) (see :mod:`benchmarks.gpu.models`), so rows report it.
In the CPU dry run nothing is capped: a "fit" there is a meter sum under a
tiny byte budget, which exercises the search, not the memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.gpu.budget import ItemBudget
from benchmarks.gpu.env import Env, schedules
from benchmarks.gpu.models import amoebanet_d, parameter_count
from benchmarks.gpu.results import ItemResult, Results
from pipesched import Pipeline
from pipesched.runtime.partition import even_balance

NAME = "memory"
TITLE = "4. AmoebaNet-D (L, D) memory per schedule (checkpoint never), and the largest L under a cap"
OPTIONS = ("mem_cap_gb",)
COLUMNS = [("part", "part"), ("experiment", "experiment"), ("L", "L"), ("D", "D"), ("p", "p"), ("m", "m"),
           ("schedule", "schedule"), ("params_m", "params (M)"), ("fits", "fits"),
           ("peak_gib", "max_memory_allocated GiB"), ("step_gib", "step peak above start GiB"),
           ("meter_gib", "meter sum GiB"), ("meter_per_rank_mib", "meter per rank MiB"), ("largest_L", "largest L"),
           ("trials", "L tried")]
#: schedules in the order they are worth measuring when time is short
PRIORITY = ("gpipe", "1f1b", "zb-h1", "zb-v", "interleaved-1f1b", "dualpipe-v", "interleaved-zb", "looped-bfs")
GIB = 2**30


def sizes(env: Env) -> dict[str, Any]:
    if env.dry_run:
        return dict(seed=[("naive-1", 3, 4, 1), ("pipeline-2", 3, 8, 2)],
                    image=32, batch=8, D=4, ladder=[3, 6, 12, 24], ranks=(2,), dry_cap=1_000_000)
    return dict(seed=[("naive-1", 6, 208, 1), ("pipeline-1", 6, 416, 1), ("pipeline-2", 6, 544, 2),
                      ("pipeline-4", 12, 544, 4), ("pipeline-8", 24, 512, 8)],
                image=224, batch=32, D=256, ladder=[3, 6, 9, 12, 18, 24, 36, 48, 72, 96, 144, 192],
                ranks=(4, 8, 2, 1), dry_cap=0)


def chunks_for(p: int) -> int:
    return max(8, 2 * p)


def measure(env: Env, L: int, D: int, p: int, schedule: str | None, stages: int, size: dict[str, Any],
            capped: bool = False) -> dict[str, Any]:
    """One training step of AmoebaNet-D (L, D); ``schedule=None``: the plain model (naive).

    ``capped``: part B's search, where in the dry run a fit is a meter sum under ``size["dry_cap"]``.
    """
    env.free()
    g = torch.Generator(device=env.device).manual_seed(0)
    x = torch.randn(size["batch"], 3, size["image"], size["image"], device=env.device, generator=g)
    y = torch.randint(0, 1000, (size["batch"],), device=env.device, generator=g)
    torch.manual_seed(0)
    with torch.device(env.device):
        model = amoebanet_d(L, D)
    loss_fn = nn.CrossEntropyLoss()
    out: dict[str, Any] = {"params_m": parameter_count(model) / 1e6, "m": 1 if schedule is None else chunks_for(p)}
    try:
        if schedule is None:
            start = env.reset_peak()
            loss_fn(model(x), y).backward()
            out.update(peak=env.peak(), start=start, meter=[])
        else:
            with Pipeline(model, schedule=schedule, balance=even_balance(len(model), stages),
                          devices=[env.device] * p, chunks=chunks_for(p), checkpoint="never",
                          loss_fn=loss_fn) as pipe:
                start = env.reset_peak()
                pipe.step(x, y)
                out.update(peak=env.peak(), start=start, meter=list(pipe.last_report.peak_activation_bytes))
        out["fits"] = True
    except Exception as error:  # noqa: BLE001 - out of memory is a result here
        if not env.is_oom(error):
            raise
        out.update(fits=False, oom=str(error).splitlines()[0][:160])
    finally:
        del model, x, y
        env.free()
    if capped and out["fits"] and not env.cuda:
        out["fits"] = sum(out["meter"]) <= size["dry_cap"]
    return out


def _row(out: dict[str, Any]) -> dict[str, Any]:
    if not out.get("fits") or "peak" not in out:
        return {"fits": out.get("fits", False)}
    meter = out["meter"]
    return {"fits": True, "peak_gib": out["peak"] / GIB, "step_gib": (out["peak"] - out["start"]) / GIB,
            "meter_gib": sum(meter) / GIB, "meter_per_rank_mib": "/".join(f"{b / 2**20:.0f}" for b in meter)}


def run(env: Env, results: Results, budget: ItemBudget, mem_cap_gb: float = 24.0) -> ItemResult:
    item = results.add_item(NAME, TITLE, COLUMNS)
    size = sizes(env)
    item.extra["sizes"] = {k: v for k, v in size.items()}
    part_a_until = budget.left() * 0.6  # part A may use the first 40 % of the item's time
    estimate, done = 1.0, 0
    for experiment, L, D, p in size["seed"]:
        runs = [(None, 1)] if experiment == "naive-1" else schedules(env, p, PRIORITY)
        for schedule, stages in runs:
            label = f"A {experiment} ({L}, {D}) {schedule or 'plain'}"
            if done and budget.left() - estimate < part_a_until:  # the first runs whatever the budget
                results.skip(item, label, "part A's share of the item budget is spent")
                continue
            seconds, out = env.timed(lambda: measure(env, L, D, p, schedule, stages, size))
            estimate, done = max(estimate, seconds), done + 1
            results.row(item, part="A", experiment=experiment, L=L, D=D, p=p, m=out["m"], schedule=schedule or "-",
                        params_m=out["params_m"], seconds=seconds, **_row(out), oom=out.get("oom"))
    _largest(env, results, item, budget, size, mem_cap_gb, estimate)
    return item


def amoeba_layers(L: int) -> int:
    """How many layers :func:`amoebanet_d` returns for L (a stage needs at least one)."""
    return 3 * -(-L // 3) + 8


def search(ladder: list[int], start: int, trial: Any, more: Any) -> tuple[int, dict[int, bool], bool]:
    """The largest index of ``ladder`` whose trial passes, by galloping up then bisecting.

    ``trial(L) -> bool``; ``more() -> bool`` says whether another trial fits
    the time budget. Returns (index or -1, {L: passed}, whether the search
    finished).
    """
    lo, hi, probe = -1, len(ladder), min(max(start, 0), len(ladder) - 1)
    tried: dict[int, bool] = {}
    while hi - lo > 1 and more():
        passed = trial(ladder[probe])
        tried[ladder[probe]] = passed
        lo, hi = (probe, hi) if passed else (lo, probe)
        probe = min(len(ladder) - 1, 2 * lo + 1) if hi == len(ladder) else (lo + hi) // 2
        probe = max(probe, lo + 1)
    return lo, tried, hi - lo <= 1


def _largest(env: Env, results: Results, item: ItemResult, budget: ItemBudget, size: dict[str, Any],
             mem_cap_gb: float, estimate: float) -> None:
    D = size["D"]
    with env.memory_cap(int(mem_cap_gb * 1e9)) as fraction:
        results.note(item, f"part B cap: {mem_cap_gb:g} GB for the whole process (fraction {fraction})"
                     if env.cuda else f"part B (dry run): a fit is a meter sum <= {size['dry_cap']} bytes")
        for p in size["ranks"]:
            start_L = 0  # where the previous schedule's search ended: a good first guess
            for schedule, stages in schedules(env, p, PRIORITY):
                label = f"B p={p} {schedule}"
                ladder = [L for L in size["ladder"] if amoeba_layers(L) >= stages]
                outs: dict[int, dict[str, Any]] = {}

                def trial(L: int) -> bool:
                    nonlocal estimate
                    seconds, outs[L] = env.timed(lambda: measure(env, L, D, p, schedule, stages, size,
                                                                      capped=True))
                    estimate = max(estimate, seconds)
                    return bool(outs[L]["fits"])

                def more() -> bool:  # part B's first trial runs whatever the budget
                    return not (outs or any(r["part"] == "B" for r in item.rows)) or budget.fits(1.5 * estimate)

                start = max([i for i, L in enumerate(ladder) if L <= start_L], default=0)
                lo, tried, complete = search(ladder, start, trial, more)
                if not tried:
                    results.skip(item, label, f"item budget ({budget.left():.0f} s left)")
                    continue
                best = ladder[lo] if lo >= 0 else 0
                note = "" if complete else " (search cut short)"
                if lo == len(ladder) - 1:
                    note += " (the ladder's top)"
                start_L = best
                out = outs.get(best, {"fits": False})
                results.row(item, part="B", experiment=f"pipeline-{p}", L=best, D=D, p=p, m=chunks_for(p),
                            schedule=schedule, params_m=out.get("params_m"), largest_L=f"{best}{note}",
                            trials=",".join(f"{L}{'' if ok else 'x'}" for L, ok in sorted(tried.items())),
                            **_row(out))
