"""11. When a CPU pipeline pays: pipelined vs plain training of a GPT-style model on the same cores.

A new user's first trial is a small language model on a laptop: 2 CPU ranks,
the plain model as the yardstick. This benchmark measures that trial, side
by side in alternating rounds, on the cores this process may use (C):

* ``plain C thr``: the un-pipelined model, whole batch, torch's default of
  C intra-op threads (what ``loss_fn(model(x), y).backward()`` does);
* ``plain 1 thr``: the same on one thread (what one core gives);
* ``pipe C thr/rank``: 2 ranks, 1F1B, each rank's worker with C intra-op
  threads (torch's default): the ranks' ops fight for the same cores;
* ``pipe C/2 thr/rank``: the same pipeline, C // 2 threads per rank (one
  per rank on 2 cores), what ``pipesched compare``/``demo`` pick.

Speed is plain-C's step time ÷ the contender's (1.0: as fast as plain
training; below: slower). CPU ms/step is the process's CPU time per step (all
threads): on a shared machine the wall time depends on what else runs, the CPU
time is what the contender itself burnt, spinning OpenMP threads included. Memory is per rank: the pipeline's peak activation
bytes (the engine's meter) and parameter bytes against the plain model's on
one device, the reason to pipeline on CPU at all. Each pipeline's worker
threads are built under their thread count (a thread reads it at its first
op); a probe records what each thread really used.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.config import RunConfig
from benchmarks.gpt import GPTWorkload
from benchmarks.rounds import alternating_rounds
from benchmarks.stats import fmt, summary
from benchmarks.table import format_table
from benchmarks.threads import intra_op_threads
from pipesched import Pipeline
from pipesched.runtime.cpu_threads import available_cores

NAME = "cpu_pays"
TITLE = "11. When a CPU pipeline pays: GPT-style model, 2 ranks vs plain training on the same cores"
RANKS = 2


def _contender(threads: int, step: Callable[[], object], cpu: list[float]) -> Callable[[int], float]:
    """``k`` steps with the calling thread's intra-op count at ``threads``; returns the wall seconds.

    Appends the process's CPU seconds per step to ``cpu``: on a shared machine
    wall time depends on what others run, CPU time is the work (and spinning)
    the contender itself did.
    """

    def run(k: int) -> float:
        torch.set_num_threads(threads)
        start, busy = time.perf_counter(), time.process_time()
        for _ in range(k):
            step()
        cpu.append((time.process_time() - busy) / k)
        return time.perf_counter() - start

    return run


def _threads_used(model: nn.Module, step: Callable[[], object]) -> dict[str, int]:
    """``{thread name: torch.get_num_threads()}`` of every thread that ran a forward in one ``step``."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def hook(module: nn.Module, args: object) -> None:
        with lock:
            seen.setdefault(threading.current_thread().name, torch.get_num_threads())

    handles = [m.register_forward_pre_hook(hook) for m in model.children()]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _param_bytes(modules: list[nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def run(cfg: RunConfig) -> dict[str, Any]:
    work = cfg.pick(
        tiny=GPTWorkload(width=32, layers=2, heads=2, vocab=64, seq=16, batch=4),
        quick=GPTWorkload(width=128, layers=4, heads=4, vocab=512, seq=64, batch=16),
        full=GPTWorkload(width=256, layers=6, heads=8, vocab=1024, seq=128, batch=16),
    )
    chunk_counts = cfg.pick(tiny=[2], quick=[4], full=[4, 8])
    rounds = cfg.n_rounds(tiny=1, quick=5, full=9)
    cores = available_cores()
    share = max(1, cores // RANKS)
    model = work.model()
    x, y = work.data()
    criterion = nn.CrossEntropyLoss()
    balance = work.two_rank_balance()

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()

    with intra_op_threads(cores), Pipeline(model, devices=["cpu"], balance=[len(model)], chunks=1,
                                           checkpoint="never", loss_fn=criterion) as whole:
        whole.step(x, y)
        plain_activations = whole.last_report.peak_activation_bytes[0]
    plain_params = _param_bytes(list(model.children()))
    children = list(model.children())
    rank_params = [_param_bytes(children[:balance[0]]), _param_bytes(children[balance[0]:])]

    rows, table_rows, threads_seen, memory_rows = [], [], {}, []
    for m in chunk_counts:
        pipes: dict[str, Pipeline] = {}
        cpu: dict[str, list[float]] = {f"plain {cores} thr": [], "plain 1 thr": []}
        contenders = {f"plain {cores} thr": _contender(cores, plain, cpu[f"plain {cores} thr"]),
                      "plain 1 thr": _contender(1, plain, cpu["plain 1 thr"])}
        try:
            for per_rank in dict.fromkeys([cores, share]):
                name = f"pipe {per_rank} thr/rank"
                with intra_op_threads(per_rank), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the oversubscribed contender is the point of the measurement
                    pipe = pipes[name] = Pipeline(model, schedule="1f1b", balance=balance, devices=["cpu"] * RANKS,
                                                  chunks=m, checkpoint="never", loss_fn=criterion)

                    def step(pipe: Pipeline = pipe) -> None:
                        model.zero_grad(set_to_none=True)
                        pipe.step(x, y)

                    threads_seen[f"m={m} {name}"] = _threads_used(model, step)  # the workers' first ops: here
                cpu[name] = []
                contenders[name] = _contender(share, step, cpu[name])
            result = alternating_rounds(contenders, rounds=rounds, steps=cfg.pick(tiny=1, quick=2, full=2), warmup=1)
            for name, pipe in pipes.items():
                report = pipe.last_report
                memory_rows.append([m, name, *(f"{b / 2**20:.2f}" for b in report.peak_activation_bytes),
                                    f"{max(report.peak_activation_bytes) / plain_activations:.2f}"])
        finally:
            for pipe in pipes.values():
                pipe.close()
        baseline = f"plain {cores} thr"
        for name in contenders:
            speed = result.ratio(baseline, name)
            cpu_seconds = summary(cpu[name][1:] or cpu[name])  # the first entry is the warm-up
            rows.append({"microbatches": m, "contender": name, "speed_vs_plain": speed,
                         "seconds_per_step": result.seconds(name), "cpu_seconds_per_step": cpu_seconds})
            table_rows.append([m, name, fmt(result.seconds(name), 1, 1e3), fmt(cpu_seconds, 1, 1e3), fmt(speed)])
        rows.append({"microbatches": m, "rounds": result.as_dict()})
        cfg.log(f"m={m}: " + ", ".join(f"{r['contender']} {fmt(r['speed_vs_plain'])}" for r in rows
                                      if r.get("microbatches") == m and "contender" in r))
    pipe_rows = [r for r in rows if str(r.get("contender", "")).startswith("pipe")]
    best = max(pipe_rows, key=lambda r: float(r["speed_vs_plain"]["median"]))
    table = format_table(["m", "contender", "ms/step", "CPU ms/step", "speed vs plain"], table_rows, title=TITLE)
    table += "\n\n" + format_table(
        ["m", "pipeline", "rank 0 act. MiB", "rank 1 act. MiB", "max rank / plain"], memory_rows,
        title=f"activation memory per rank (plain model, whole batch: {plain_activations / 2**20:.2f} MiB)",
    )
    table += (
        f"\nparameters per rank: {rank_params[0] / 2**20:.2f} / {rank_params[1] / 2**20:.2f} MiB of "
        f"{plain_params / 2**20:.2f} MiB"
        f"\nmodel: GPT-style, width {work.width}, {work.layers} blocks, {work.heads} heads, vocab {work.vocab}, "
        f"seq {work.seq}, batch {work.batch}; 1F1B on {RANKS} ranks, balance {balance}, checkpoint never (no recompute); "
        f"{cores} cores; {rounds} alternating rounds; median [min..max]"
        f"\nfastest pipeline: {best['contender']} at m={best['microbatches']} "
        f"({fmt(best['speed_vs_plain'])} of plain {cores}-thread training)"
        f"\nintra-op threads seen per thread: {threads_seen}"
    )
    return {
        "title": TITLE,
        "table": table,
        "targets": [],
        "workload": work.as_dict(),
        "cores": cores,
        "balance": balance,
        "rows": rows,
        "threads_seen": threads_seen,
        "best_pipeline": {"contender": best["contender"], "microbatches": best["microbatches"],
                          "speed_vs_plain": best["speed_vs_plain"]},
        "memory": {"plain_activation_bytes": plain_activations, "plain_parameter_bytes": plain_params,
                   "rank_parameter_bytes": rank_params, "rows": memory_rows},
    }
