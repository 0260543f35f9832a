"""The benchmark registry and the one command that runs them all."""

from __future__ import annotations

import argparse
import gc
import importlib
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.config import DEFAULT_OUT, RunConfig
from benchmarks.load import LoadMonitor, describe
from benchmarks.profiling import profiled
from benchmarks.results import machine, write_json
from benchmarks.targets import Target, format_targets
from benchmarks.threads import intra_op_threads

#: name -> module (each has NAME, TITLE and run(cfg) -> dict with "table" and "targets").
BENCHMARKS = {
    "orchestration": "benchmarks.bench_orchestration",
    "pipeline1": "benchmarks.bench_pipeline1",
    "cpu_speedup": "benchmarks.bench_cpu_speedup",
    "torch_pipelining": "benchmarks.bench_torch_pipelining",
    "ddp": "benchmarks.bench_ddp",
    "memory": "benchmarks.bench_memory",
    "real_memory": "benchmarks.bench_real_memory",
    "recompute": "benchmarks.bench_recompute",
    "split_backward": "benchmarks.bench_split_backward",
    "zero_bubble": "benchmarks.bench_zero_bubble",
    "cpu_pays": "benchmarks.bench_cpu_pays",
    "auto": "benchmarks.bench_auto",
    "tune": "benchmarks.bench_tune",
    "distributed": "benchmarks.bench_distributed",
    "hf_pipelining": "benchmarks.bench_hf_pipelining",
    "plan_scale": "benchmarks.bench_plan_scale",
}


def load_module(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def run_one(name: str, cfg: RunConfig) -> dict[str, Any]:
    """Run benchmark ``name``, print its table and verdicts, write its JSON; return the payload.

    Every benchmark runs with one intra-op thread per rank (and per peer
    process), so that 2 ranks on this 2-core machine are 2 cores and every
    baseline is one core.
    """
    module = load_module(name)
    print(f"\n=== {name}: {module.TITLE}", flush=True)
    gc.collect()
    monitor = LoadMonitor()
    with intra_op_threads(1), profiled(name, cfg.profile_dir) as trace:
        payload = module.run(cfg)
    load = monitor.finish()
    elapsed = float(load["wall_seconds"])  # type: ignore[arg-type]
    targets: list[Target] = payload.get("targets", [])
    print(payload["table"])
    if trace is not None:
        print(f"profiled: figures include torch.profiler's overhead; trace written to {trace}")
        payload = {**payload, "profile_trace": str(trace)}
    print(describe(load))
    if targets:
        print(format_targets(targets))
    payload = {
        **payload,
        "level": cfg.level,
        "seconds": elapsed,
        "load": load,
        "targets": [t.as_dict() for t in targets],
    }
    path = write_json(cfg.out_dir, name, payload)
    print(f"({name}: {elapsed:.1f} s, wrote {path})", flush=True)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the pipesched benchmarks; each prints a table and writes <out>/<name>.json.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds (about a minute)")
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; figures meaningless)")
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME",
        help=f"run only these (repeat or comma-separate): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON directory (default {DEFAULT_OUT})")
    parser.add_argument("--rounds", type=int, default=None, help="override every benchmark's round count")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="run each benchmark under torch.profiler (every thread) and write "
                             "DIR/<name>.trace.json (open it at ui.perfetto.dev); figures then include "
                             "the profiler's overhead")
    parser.add_argument(
        "--switch-interval", default="", metavar="S[,S...]",
        help="orchestration: also run its target configurations with sys.setswitchinterval(S) for each S "
             "(seconds), side by side with the default, and show the effect (the library never changes it)",
    )
    args = parser.parse_args(argv)
    if args.list:
        for name in BENCHMARKS:
            print(f"{name:18s} {load_module(name).TITLE}")
        return 0
    names = [n.strip() for chunk in args.only for n in chunk.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    level = "tiny" if args.tiny else "quick" if args.quick else "full"
    try:
        intervals = tuple(float(v) for v in args.switch_interval.split(",") if v.strip())
    except ValueError:
        parser.error(f"--switch-interval takes seconds, comma-separated (e.g. 0.0005,0.001), got {args.switch_interval!r}")
    cfg = RunConfig(level=level, out_dir=args.out, rounds=args.rounds, profile_dir=args.profile,
                    switch_intervals=intervals)
    info = machine()
    print(
        f"pipesched benchmarks ({level}) on {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"Python {info['python']}, {info['date']}; load average {info['loadavg_1_5_15']}",
        flush=True,
    )
    start = time.perf_counter()
    verdicts: list[tuple[str, dict[str, Any]]] = []
    failed = []
    loads: list[str] = []
    for name in names:
        try:
            payload = run_one(name, cfg)
        except Exception:  # noqa: BLE001 - report and go on with the other benchmarks
            traceback.print_exc()
            failed.append(name)
            continue
        verdicts += [(name, t) for t in payload["targets"]]
        others = payload["load"].get("other_processes_cpu_cores")
        loads.append(f"{name} {payload['seconds']:.0f} s" + ("" if others is None else f" (others used {others:.2f} cores)"))
    total = time.perf_counter() - start
    print(f"\n=== summary ({level}, {total:.0f} s in all)")
    for name, t in verdicts:
        print(f"  {t['verdict']}  [{name}] {t['name']}: {t['figure']:.3f} "
              f"(target {'>=' if t['higher_is_better'] else '<='} {t['threshold']:g})")
    if loads:
        print("  time and machine sharing: " + "; ".join(loads))
    for name in failed:
        print(f"  ERROR [{name}] raised; see the traceback above")
    return 1 if failed else 0
