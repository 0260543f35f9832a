"""``pipesched compare``'s command line: its arguments, and printing what :mod:`pipesched.cli.compare` measured.

The measuring itself (config, runs, the table) lives in :mod:`pipesched.cli.compare`, so that
library code and tests use it without the argument parser.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipesched.cli.common import (
    CliError,
    json_dumps,
    non_negative,
    positive,
    resolve_ranks,
    schedule_list,
)
from pipesched.cli.compare import (
    DEFAULT_SCHEDULES,
    MODELS,
    CompareConfig,
    CompareConfigError,
    format_compare_table,
    run_compare,
    threads_per_rank,
)
from pipesched.distributed.launch import launched_world

__all__ = ["add_command"]


def _run_command(args: argparse.Namespace) -> int:
    """Run the built-in model under each schedule and print one row per schedule."""
    lead = resolve_ranks(args)
    config = CompareConfig(
        schedules=args.schedules, model=args.model, ranks=args.ranks, chunks=args.chunks,
        batch=args.batch, steps=args.steps, warmup=args.warmup, checkpoint=args.checkpoint, seed=args.seed,
        threads=args.threads,
    )
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if lead else (lambda line: None)
    try:
        rows = run_compare(config, progress=say)
    except CompareConfigError as error:
        raise CliError(str(error)) from None
    if not lead:  # under torchrun only rank 0 prints the table
        return 0
    if args.what_if:
        from pipesched.cli.what_if import format_what_if, predict_rows

        if launched_world() > 1:
            raise CliError("--what-if predicts for ranks that are threads of one process; run it without torchrun")
        say("what-if: profiling the model at the micro-batch size ...")
        predict_rows(rows, config, threads_per_rank(config))
    if args.json:
        print(json_dumps([row.as_dict() for row in rows]))
    else:
        print(format_compare_table(rows, config))
        if args.what_if:
            print()
            print(format_what_if(rows))
    return 0


def add_command(commands: Any) -> None:
    compare = commands.add_parser(
        "compare", help="run a built-in model under several schedules and compare them",
        description="Same model, weights, batch and CPU ranks under each schedule: warm-up steps, "
                    "then timed steps; one row per schedule.",
    )
    compare.add_argument("--schedules", type=schedule_list, default=None, metavar="LIST",
                         help="comma-separated schedule names (default: every registered schedule that fits "
                              "--ranks, e.g. " + ",".join(DEFAULT_SCHEDULES) + ")")
    compare.add_argument("--model", choices=list(MODELS), default="mlp",
                         help="built-in model: " + "; ".join(f"{m.name}: {m.description}" for m in MODELS.values())
                         + " (default mlp)")
    compare.add_argument("--ranks", type=positive, default=None, metavar="R",
                         help="CPU ranks (default 2); interleaved-1f1b, looped-bfs, zb-v, interleaved-zb and "
                              "dualpipe-v use 2 stages per rank")
    compare.add_argument("--chunks", type=positive, default=8, metavar="M", help="micro-batches per batch (default 8)")
    compare.add_argument("--batch", type=positive, default=128, metavar="B", help="batch size (default 128)")
    compare.add_argument("--steps", type=positive, default=10, metavar="N", help="timed steps per schedule (default 10)")
    compare.add_argument("--warmup", type=non_negative, default=2, metavar="N", help="untimed warm-up steps (default 2)")
    compare.add_argument("--checkpoint", choices=["always", "except_last", "never"], default="never",
                         help="activation checkpointing policy (default never: the memory column then shows "
                              "each schedule's own profile and step times hold no recomputation)")
    compare.add_argument("--seed", type=int, default=0, metavar="N", help="random seed for weights and data (default 0)")
    compare.add_argument("--threads", type=positive, default=None, metavar="N",
                         help="intra-op threads per rank (default: cores // ranks, at least 1: ranks with more "
                              "threads than their share of the cores slow each other down)")
    compare.add_argument("--what-if", action="store_true",
                         help="also profile the model and print, per schedule, the step time the planner "
                              "predicts (profile + simulator, what auto and tune rank by) beside the measured one")
    compare.add_argument("--json", action="store_true", help="print a JSON list of row objects")
    compare.set_defaults(run=_run_command)
