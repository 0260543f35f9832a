"""``pipesched tune``: profile a built-in model and rank schedule × chunks × checkpoint × balance.

Prints the ranked table (predicted step time and peak bytes per rank, and
measured step time for the ``--measure K`` best, 3 by default), the winning
``Pipeline(...)`` line, and a sentence when not pipelining wins; ``--json`` prints :meth:`pipesched.tune.search.TuneResult.to_dict`.
Progress (profiling each micro-batch size, measuring) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipesched.cli.common import CliError, json_dumps, non_negative, positive, schedule_list

__all__ = ["add_command"]


def _memory(text: str) -> int:
    from pipesched.tune.report import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _counts(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _policies(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    bad = [n for n in names if n not in ("never", "except_last", "always")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of never, except_last, always; got {text!r}")
    return names


def _run_command(args: argparse.Namespace) -> int:
    from torch import nn

    import pipesched
    from pipesched.cli.compare import MODELS
    from pipesched.cli.models import synthetic_classification

    spec = MODELS[args.model]
    model = spec.build()
    x, y = synthetic_classification(args.batch, features=spec.features, classes=spec.classes, seed=args.seed)
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if not args.quiet else None
    try:
        result = pipesched.tune(
            model, x, y, nn.CrossEntropyLoss(), devices=["cpu"] * args.ranks, memory_budget=args.memory,
            schedules=args.schedules, chunks=args.chunks, checkpoint=args.checkpoint, measure=args.measure,
            repeat=args.repeat, progress=say, unpipelined=not args.pipelined_only,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    if args.json:
        print(json_dumps(result.to_dict()))
        return 0
    print(f"model {spec.name} ({spec.description}), {args.ranks} CPU ranks")
    print(result.format_table(top=args.top))
    return 0


def add_command(commands: Any) -> None:
    from pipesched.cli.compare import MODELS

    tune = commands.add_parser(
        "tune", help="rank schedule x chunks x checkpoint x balance for a built-in model under a memory budget",
        description="Profile the model's layers at each micro-batch size, balance it exactly for each "
                    "schedule's placement, predict step time (simulator) and peak memory per rank, and print "
                    "the ranking and the winning Pipeline(...) line.",
    )
    tune.add_argument("--model", choices=list(MODELS), default="mlp",
                      help="built-in model: " + "; ".join(f"{m.name}: {m.description}" for m in MODELS.values())
                      + " (default mlp)")
    tune.add_argument("--ranks", type=positive, default=2, metavar="R", help="CPU ranks (default 2)")
    tune.add_argument("--batch", type=positive, default=128, metavar="B", help="batch size (default 128)")
    tune.add_argument("--memory", type=_memory, default=None, metavar="BYTES",
                      help="budget per rank for activations + parameters + gradients: 1000000, 512KiB, 2GiB "
                           "(default: none)")
    tune.add_argument("--schedules", type=schedule_list, default=None, metavar="LIST",
                      help="comma-separated schedule names (default: every registered schedule that fits)")
    tune.add_argument("--chunks", type=_counts, default=None, metavar="LIST",
                      help="micro-batch counts to try, e.g. 4,8,16 (default: powers of two up to --batch)")
    tune.add_argument("--checkpoint", type=_policies, default=None, metavar="LIST",
                      help="policies to try (default never,except_last,always)")
    tune.add_argument("--measure", type=non_negative, default=3, metavar="K",
                      help="run the K best candidates for real, side by side, rank them by measured time and "
                           "warn where the prediction is off by more than 15%% (default 3; 0: predict only)")
    tune.add_argument("--pipelined-only", action="store_true",
                      help="leave out the 'don't pipeline' candidates (the plain model, gradient accumulation)")
    tune.add_argument("--repeat", type=positive, default=3, metavar="N", help="timed runs per layer (default 3)")
    tune.add_argument("--top", type=positive, default=10, metavar="N", help="rows of the table (default 10)")
    tune.add_argument("--seed", type=int, default=0, metavar="N", help="random seed for the data (default 0)")
    tune.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    tune.add_argument("--json", action="store_true", help="print the whole result as JSON")
    tune.set_defaults(run=_run_command)
