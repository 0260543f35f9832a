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
        return {"seed": [("naive-1", 3, 4, 1), ("pipeline-2", 3, 8, 2)],
                "image": 32, "batch": 8, "D": 4, "ladder": [3, 6, 12, 24], "ranks": (2,), "dry_cap": 1_000_000}
    return {"seed": [("naive-1", 6, 208, 1), ("pipeline-1", 6, 416, 1), ("pipeline-2", 6, 544, 2),
                     ("pipeline-4", 12, 544, 4), ("pipeline-8", 24, 512, 8)],
            "image": 224, "batch": 32, "D": 256, "ladder": [3, 6, 9, 12, 18, 24, 36, 48, 72, 96, 144, 192],
            "ranks": (4, 8, 2, 1), "dry_cap": 0}


_PARAMS: dict[tuple[int, int], float] = {}


def _params_m(L: int, D: int) -> float:
    """Millions of parameters of AmoebaNet-D (L, D), counted on the meta device (no memory)."""
    if (L, D) not in _PARAMS:
        with torch.device("meta"):
            _PARAMS[L, D] = parameter_count(amoebanet_d(L, D)) / 1e6
    return _PARAMS[L, D]


def chunks_for(p: int) -> int:
    return max(8, 2 * p)


def measure(env: Env, L: int, D: int, p: int, schedule: str | None, stages: int, size: dict[str, Any],
            capped: bool = False) -> dict[str, Any]:
    """One training step of AmoebaNet-D (L, D); ``schedule=None``: the plain model (naive).

    ``capped``: part B's search, where in the dry run a fit is a meter sum under ``size["dry_cap"]``.
    """
    env.free()
    loss_fn = nn.CrossEntropyLoss()
    out: dict[str, Any] = {"m": 1 if schedule is None else chunks_for(p), "params_m": _params_m(L, D)}
    held: dict[str, Any] = {}  # everything on the device, dropped in one place whatever fails
    try:  # building the model under the cap can run out of memory too
        g = torch.Generator(device=env.device).manual_seed(0)
        held["x"] = torch.randn(size["batch"], 3, size["image"], size["image"], device=env.device, generator=g)
        held["y"] = torch.randint(0, 1000, (size["batch"],), device=env.device, generator=g)
        torch.manual_seed(0)
        with torch.device(env.device):
            held["model"] = model = amoebanet_d(L, D)
        if schedule is None:
            start = env.reset_peak()
            loss_fn(model(held["x"]), held["y"]).backward()
            out.update(peak=env.peak(), start=start, meter=[])
        else:
            with Pipeline(model, schedule=schedule, balance=even_balance(len(model), stages),
                          devices=[env.device] * p, chunks=chunks_for(p), checkpoint="never",
                          loss_fn=loss_fn) as pipe:
                start = env.reset_peak()
                pipe.step(held["x"], held["y"])
                out.update(peak=env.peak(), start=start, meter=list(pipe.last_report.peak_activation_bytes))
            del pipe
        out["fits"] = True
    except Exception as error:  # out of memory is a result here; anything else is raised
        if not env.is_oom(error):
            raise
        out.update(fits=False, oom=str(error).splitlines()[0][:160])
    finally:
        held.clear()
        model = None
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
    item.extra["sizes"] = dict(size)
    part_a_until = budget.left() * 0.6  # part A may use the first 40 % of the item's time
    estimate, done = 1.0, 0
    for experiment, L, D, p in size["seed"]:
        runs = [(None, 1)] if experiment == "naive-1" else schedules(env, p, PRIORITY)
        for schedule, stages in runs:
            label = f"A {experiment} ({L}, {D}) {schedule or 'plain'}"
            if done and budget.left() - estimate < part_a_until:  # the first runs whatever the budget
                results.skip(item, label, "part A's share of the item budget is spent")
                continue
            seconds, out = env.timed(measure, env, L, D, p, schedule, stages, size)
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
    with env.memory_cap(int(mem_cap_gb * 1e9)) as fraction:
        results.note(item, f"part B cap: {mem_cap_gb:g} GB for the whole process (fraction {fraction})"
                     if env.cuda else f"part B (dry run): a fit is a meter sum <= {size['dry_cap']} bytes")
        for p in size["ranks"]:
            start_L = 0  # where the previous schedule's search ended: a good first guess
            for schedule, stages in schedules(env, p, PRIORITY):
                start_L, estimate = _largest_one(env, results, item, budget, size, p, schedule, stages, start_L,
                                                 estimate)


def _largest_one(env: Env, results: Results, item: ItemResult, budget: ItemBudget, size: dict[str, Any], p: int,
                 schedule: str, stages: int, start_L: int, estimate: float) -> tuple[int, float]:
    """Part B for one (p, schedule): record the largest L that fits; returns it and the updated estimate."""
    D = size["D"]
    ladder = [L for L in size["ladder"] if amoeba_layers(L) >= stages]
    outs: dict[int, dict[str, Any]] = {}
    first = not any(r["part"] == "B" for r in item.rows)

    def trial(L: int) -> bool:
        nonlocal estimate
        seconds, outs[L] = env.timed(measure, env, L, D, p, schedule, stages, size, True)
        estimate = max(estimate, seconds)
        return bool(outs[L]["fits"])

    def more() -> bool:  # part B's first trial runs whatever the budget
        return (first and not outs) or budget.fits(1.5 * estimate)

    start = max([i for i, L in enumerate(ladder) if L <= start_L], default=0)
    lo, tried, complete = search(ladder, start, trial, more)
    if not tried:
        results.skip(item, f"B p={p} {schedule}", f"item budget ({budget.left():.0f} s left)")
        return start_L, estimate
    best = ladder[lo] if lo >= 0 else 0
    note = "" if complete else " (search cut short)"
    if lo == len(ladder) - 1:
        note += " (the ladder's top)"
    out = outs.get(best, {"fits": False})
    results.row(item, part="B", experiment=f"pipeline-{p}", L=best, D=D, p=p, m=chunks_for(p), schedule=schedule,
                params_m=out.get("params_m"), largest_L=f"{best}{note}",
                trials=",".join(f"{L}{'' if ok else 'x'}" for L, ok in sorted(tried.items())), **_row(out))
    return best, estimate
