"""``python -m benchmarks.gpu --out DIR [--cpu-dry-run] [--budget-s 480] [--only NAME,...]``.

Runs issue 16's items 2-5 in order of value, each inside its share of the
budget, and writes ``DIR/gpu.json`` and ``DIR/gpu.md`` after every
measurement. Exit status: 0 all correct; 1 a wrong gradient (or a model that
disagrees with its reference); 2 an item raised; 3 the watchdog ended a run
that overran its budget by ``--grace-s``; 4 no CUDA device without
``--cpu-dry-run``. Whatever happens, what was measured is on disk.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.gpu.budget import Budget, Watchdog
from benchmarks.gpu.env import Env, describe
from benchmarks.gpu.results import Results

#: (name, module, share of the budget), in order of value: correctness first.
ITEMS = (
    ("gradients", "benchmarks.gpu.grads", 0.20),
    ("resnet", "benchmarks.gpu.resnet", 0.22),
    ("memory", "benchmarks.gpu.memory", 0.23),
    ("orchestration", "benchmarks.gpu.orchestration", 0.25),
    ("any_model", "benchmarks.gpu.any_model", 0.10),
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md (e.g. $OUT)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: checks the script runs")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds the whole run may take (default 480; 60 with --cpu-dry-run)")
    parser.add_argument("--grace-s", type=float, default=45.0,
                        help="the watchdog ends the process this long after the budget (default 45)")
    parser.add_argument("--only", default="", help=f"comma-separated items: {', '.join(n for n, _, _ in ITEMS)}")
    parser.add_argument("--mem-cap-gb", type=float, default=24.0,
                        help="memory cap of item 4's largest-model search, GB (default 24: a P40)")
    parser.add_argument("--corrupt-gradient", action="store_true",
                        help="testing only: add 1 to the first gradient compared, to see a wrong gradient fail the run")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 60.0 if args.cpu_dry_run else 480.0
    known = {n for n, _, _ in ITEMS}
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(args.only) - known)
    if unknown:
        parser.error(f"--only {','.join(unknown)}: unknown item; choose from {', '.join(sorted(known))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu check: no CUDA device visible (torch.cuda.is_available() is False); "
              "pass --cpu-dry-run to run the tiny CPU version", file=sys.stderr)
        return 4
    env = Env(torch.device("cpu") if args.cpu_dry_run else torch.device("cuda", 0), args.cpu_dry_run)
    if env.cuda:
        torch.cuda.set_device(env.device)
    else:
        torch.set_num_threads(1)  # several ranks share 2 loaded cores in the dry run; oversubscription stalls
    budget = Budget(args.budget_s)
    meta = {**describe(env), "budget_s": args.budget_s, "argv": sys.argv, "mem_cap_gb": args.mem_cap_gb}
    results = Results(args.out, meta)
    watchdog = Watchdog(args.budget_s + args.grace_s, lambda: _finish(results, budget, "watchdog")).start()
    try:  # the watchdog must not outlive this call (an in-process caller, a test, lives on)
        selected = [item for item in ITEMS if not args.only or item[0] in args.only]
        for index, (name, module_name, weight) in enumerate(selected):
            share = budget.share(weight, sum(w for _, _, w in selected[index:]))
            print(f"gpu check: {name}: {share.seconds:.0f} s share ({budget.left():.0f} s left)", flush=True)
            started = time.monotonic()
            module = importlib.import_module(module_name)
            item = None
            try:
                item = module.run(env, results, share, **_options(module, args))
                status = "done"
            except Exception:  # noqa: BLE001 - one item's crash must not lose the others
                status = "error"
                item = item or results.items.get(name) or results.add_item(name, getattr(module, "TITLE", name), [])
                results.error(item, traceback.format_exc(limit=12))
                traceback.print_exc()
            finally:
                env.free()
            if item is not None:
                results.set(item, status=status, seconds=time.monotonic() - started, budget_s=share.seconds)
            print(f"gpu check: {name}: {status} in {time.monotonic() - started:.1f} s, {len(item.rows)} rows, "
                  f"{len(item.skipped)} skipped, {len(item.failures)} wrong", flush=True)
    finally:
        watchdog.cancel()
    return _finish(results, budget, "end")


def _options(module: object, args: argparse.Namespace) -> dict[str, object]:
    accepted = getattr(module, "OPTIONS", ())
    return {name: getattr(args, name) for name in accepted}


def _finish(results: Results, budget: Budget, how: str) -> int:
    results.meta.update(elapsed_s=round(budget.elapsed(), 1), ended_by=how)
    results.save()
    failures, errors = results.failures(), results.errors()
    print(results.markdown(), flush=True)
    print(f"gpu check: wrote {results.out_dir / 'gpu.json'} and {results.out_dir / 'gpu.md'} "
          f"({budget.elapsed():.0f} s)", flush=True)
    if failures:
        print(f"gpu check: FAILED: {len(failures)} wrong result(s):\n  " + "\n  ".join(failures),
              file=sys.stderr, flush=True)
        return 1
    if errors:
        print(f"gpu check: ERROR: {len(errors)} item(s) raised (see gpu.md)", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
