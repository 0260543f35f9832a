"""The command line: ``pipesched schedule show|list``, ``timeline``, ``compare``, ``demo``.

A user's mistake (a bad flag, a value out of range, a shape the schedule
refuses, a missing file) prints exactly one line on stderr and exits with
status 2, argparse's convention. Only the calls that can fail for such reasons
are guarded, and only for the exceptions they document, so a real bug still
shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["PLOT_HINT", "CliError", "build_parser", "export_timeline", "main", "matplotlib_missing"]


class CliError(Exception):
    """A user's mistake, already worded for the terminal: ``main`` prints it and exits 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a parse error is one line (no usage block) pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- value types


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _cost(minimum_exclusive: bool) -> Callable[[str], float]:
    """A finite float > 0 (task costs: a zero-length task draws nothing) or >= 0 (comm)."""
    bound = "> 0" if minimum_exclusive else ">= 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (minimum_exclusive and value == 0):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value

    return parse


def _schedule(text: str) -> str:
    from pipesched.registry import list_schedules

    if text.strip().lower() not in list_schedules():
        raise argparse.ArgumentTypeError(
            f"unknown schedule {text!r}; available: {', '.join(list_schedules())}"
        )
    return text.strip().lower()


def _schedule_list(text: str) -> list[str]:
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated schedule names, e.g. gpipe,1f1b")
    return list(dict.fromkeys(_schedule(name) for name in names))


# ------------------------------------------------------------- schedule show


def _schedule_show(args: argparse.Namespace) -> int:
    """Chart the plan on a time grid from the simulator, then its makespan, bubble and bound."""
    from pipesched.plan_chart import (
        PlanError,
        build_chart,
        format_chart,
        format_summary,
    )

    try:
        chart = build_chart(args.name, args.stages, args.microbatches, args.ranks,
                            args.forward_cost, args.backward_cost, args.comm)
    except PlanError as error:
        raise CliError(f"{error} (--stages {args.stages}, --ranks {args.ranks or 'default'})") from None
    print(format_chart(chart))
    print()
    print(format_summary(chart))
    return 0


def _schedule_list_command(args: argparse.Namespace) -> int:
    from pipesched.registry import list_schedules

    print("\n".join(list_schedules()))
    return 0


# ----------------------------------------------------------------- timeline


def _timeline(args: argparse.Namespace) -> int:
    """Analyse one step of a JSON-lines log; optionally export a trace and a Gantt chart."""
    from pipesched.timeline import Timeline

    if args.gantt is not None:
        _require_matplotlib("--gantt")
    logs = args.log if len(args.log) > 1 else args.log[0]
    named = " ".join(map(str, args.log))
    try:
        timeline = Timeline.from_jsonl(logs, step=args.step)
    except FileNotFoundError as error:
        raise CliError(f"no such log file: {error.filename or named}") from None
    except OSError as error:  # a directory, no permission
        raise CliError(f"cannot read {error.filename or named}: {error.strerror or error}") from None
    except ValueError as error:  # not JSON, no task events, unknown --step
        raise CliError(f"{named}: {error}") from None
    written = export_timeline(timeline, args.chrome, args.gantt)  # first, so a bad path prints nothing else
    analysis = timeline.analyze()
    if args.json:
        print(_json_dumps({"log": named, "step": timeline.step, **analysis.as_dict()}))
    else:
        print(f"log {named}, step {timeline.step if timeline.step is not None else '?'}")
        print(analysis.format_table())
    notes = sys.stderr if args.json else sys.stdout  # keep --json output parseable
    for line in written:
        print(line, file=notes)
    return 0


def export_timeline(timeline: Any, chrome: Path | None, gantt: Path | None) -> list[str]:
    """Write the requested files; returns one "wrote ..." line for each."""
    lines = []
    if chrome is not None:
        _write(lambda: timeline.to_chrome_trace(chrome), chrome)
        lines.append(f"wrote {chrome}  (Chrome/Perfetto trace: open it at https://ui.perfetto.dev)")
    if gantt is not None:
        _write(lambda: timeline.to_gantt_png(gantt), gantt)
        lines.append(f"wrote {gantt}  (Gantt chart, one row per rank)")
    return lines


def _write(action: Callable[[], object], path: Path) -> None:
    """Run one export; a path that cannot be written is the user's to fix."""
    try:
        action()
    except OSError as error:
        raise CliError(f"cannot write {path}: {error.strerror or error}") from None


PLOT_HINT = "pip install 'pipesched[plot]' (or pip install matplotlib)"


def matplotlib_missing() -> bool:
    """True when the Gantt export cannot work; checked up front so nothing half-runs."""
    try:
        importlib.import_module("matplotlib.figure")
    except ImportError:
        return True
    return False


def _require_matplotlib(flag: str) -> None:
    if matplotlib_missing():
        raise CliError(f"{flag} needs matplotlib, which is not installed: {PLOT_HINT}")


def _json_dumps(value: object) -> str:
    import json

    return json.dumps(value, indent=2, allow_nan=True)


# ------------------------------------------------------------------ compare


def resolve_ranks(args: argparse.Namespace) -> bool:
    """Settle ``args.ranks``: torchrun's process count, else the flag (default 2).

    Under torchrun the process group is joined here. Returns whether this
    process prints (rank 0, or the only process).
    """
    from pipesched.launch import init_process_group, launched_world

    world = launched_world()
    if world == 1:
        args.ranks = args.ranks or 2
        return True
    if args.ranks not in (None, world):
        raise CliError(f"--ranks {args.ranks} conflicts with the {world} processes torchrun started; drop --ranks")
    args.ranks = world
    rank, _ = init_process_group()
    return rank == 0


def _compare(args: argparse.Namespace) -> int:
    """Run the built-in model under each schedule and print one row per schedule."""
    from pipesched.compare import (
        CompareConfig,
        CompareConfigError,
        format_compare_table,
        run_compare,
    )

    lead = resolve_ranks(args)
    config = CompareConfig(
        schedules=args.schedules, model=args.model, ranks=args.ranks, chunks=args.chunks,
        batch=args.batch, steps=args.steps, warmup=args.warmup, checkpoint=args.checkpoint, seed=args.seed,
    )
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if lead else (lambda line: None)
    try:
        rows = run_compare(config, progress=say)
    except CompareConfigError as error:
        raise CliError(str(error)) from None
    if not lead:  # under torchrun only rank 0 prints the table
        return 0
    if args.json:
        print(_json_dumps([row.as_dict() for row in rows]))
    else:
        print(format_compare_table(rows, config))
    return 0


# --------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    """Train the built-in model; its body lives in :mod:`pipesched.cli_demo`."""
    from pipesched.cli_demo import run_demo

    return run_demo(args)


# ------------------------------------------------------------------- parser


def _add_schedule_commands(commands: Any) -> None:
    schedule = commands.add_parser("schedule", help="inspect schedules without running a model")
    actions = schedule.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show", help="chart a schedule's plan on a time grid and simulate it",
        description="Chart NAME's plan, one row per rank, actions placed in time by the simulator "
                    "(default: unit costs, F = B = 1), then its makespan, bubble, peak in-flight "
                    "micro-batches and lower bound.",
    )
    show.add_argument("name", type=_schedule, metavar="NAME", help="schedule name (see: pipesched schedule list)")
    show.add_argument("--stages", type=_positive, required=True, metavar="S", help="number of stages S")
    show.add_argument("--microbatches", type=_positive, required=True, metavar="M", help="micro-batches per batch M")
    show.add_argument("--ranks", type=_positive, default=None, metavar="R",
                      help="ranks R (default: the schedule's own count: S for gpipe/1f1b, S/2 for interleaved)")
    show.add_argument("--forward-cost", type=_cost(True), default=1.0, metavar="F", help="cost of one forward (default 1)")
    show.add_argument("--backward-cost", type=_cost(True), default=1.0, metavar="B", help="cost of one backward (default 1)")
    show.add_argument("--comm", type=_cost(False), default=0.0, metavar="C",
                      help="cost added to every cross-rank dependency (default 0)")
    show.set_defaults(run=_schedule_show)
    listing = actions.add_parser("list", help="print every registered schedule name")
    listing.set_defaults(run=_schedule_list_command)


def _add_timeline_command(commands: Any) -> None:
    timeline = commands.add_parser(
        "timeline", help="analyse a JSON-lines task log; export a Chrome trace or a Gantt PNG",
        description="Read one step of a structlog JSON-lines log (pipesched.configure_jsonl_logging, "
                    "or pipesched demo's timeline.jsonl) and say where the time went.",
    )
    timeline.add_argument("log", type=Path, nargs="+", metavar="LOG.jsonl",
                          help="the JSON-lines log; several (one per process of a torchrun job) are merged")
    timeline.add_argument("--step", type=_non_negative, default=None, metavar="N",
                          help="which logged step to analyse (default: the last one)")
    timeline.add_argument("--chrome", type=Path, metavar="OUT.json", help="write a Chrome/Perfetto trace here")
    timeline.add_argument("--gantt", type=Path, metavar="OUT.png", help="write a Gantt chart PNG here (needs matplotlib)")
    timeline.add_argument("--json", action="store_true", help="print the analysis as JSON")
    timeline.set_defaults(run=_timeline)


def _add_compare_command(commands: Any) -> None:
    from pipesched.compare import DEFAULT_SCHEDULES, MODELS

    compare = commands.add_parser(
        "compare", help="run a built-in model under several schedules and compare them",
        description="Same model, weights, batch and CPU ranks under each schedule: warm-up steps, "
                    "then timed steps; one row per schedule.",
    )
    compare.add_argument("--schedules", type=_schedule_list, default=list(DEFAULT_SCHEDULES), metavar="LIST",
                         help=f"comma-separated schedule names (default {','.join(DEFAULT_SCHEDULES)})")
    compare.add_argument("--model", choices=list(MODELS), default="mlp",
                         help="built-in model: " + "; ".join(f"{m.name}: {m.description}" for m in MODELS.values())
                         + " (default mlp)")
    compare.add_argument("--ranks", type=_positive, default=None, metavar="R",
                         help="CPU ranks (default 2); interleaved-1f1b uses 2 stages per rank")
    compare.add_argument("--chunks", type=_positive, default=8, metavar="M", help="micro-batches per batch (default 8)")
    compare.add_argument("--batch", type=_positive, default=128, metavar="B", help="batch size (default 128)")
    compare.add_argument("--steps", type=_positive, default=10, metavar="N", help="timed steps per schedule (default 10)")
    compare.add_argument("--warmup", type=_non_negative, default=2, metavar="N", help="untimed warm-up steps (default 2)")
    compare.add_argument("--checkpoint", choices=["always", "except_last", "never"], default="never",
                         help="activation checkpointing policy (default never: the memory column then shows "
                              "each schedule's own profile and step times hold no recomputation)")
    compare.add_argument("--seed", type=int, default=0, metavar="N", help="random seed for weights and data (default 0)")
    compare.add_argument("--json", action="store_true", help="print a JSON list of row objects")
    compare.set_defaults(run=_compare)


def _add_demo_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="train a small built-in model on CPU through the pipeline",
        description="Train the residual MLP on synthetic data, then write the last steps' timeline log, "
                    "a Chrome trace and a Gantt chart into --out.",
    )
    demo.add_argument("--schedule", type=_schedule, default="1f1b", metavar="NAME", help="schedule name (default 1f1b)")
    demo.add_argument("--ranks", type=_positive, default=None, metavar="R",
                      help="CPU ranks (default 2; under torchrun: one per process)")
    demo.add_argument("--chunks", type=_positive, default=4, metavar="M", help="micro-batches per batch (default 4)")
    demo.add_argument("--steps", type=_positive, default=200, metavar="N", help="training steps (default 200)")
    demo.add_argument("--batch", type=_positive, default=64, metavar="B", help="batch size (default 64)")
    demo.add_argument("--blocks", type=_positive, default=8, metavar="N", help="residual blocks (default 8)")
    demo.add_argument("--samples", type=_positive, default=4096, metavar="N", help="dataset size (default 4096)")
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    demo.add_argument("--out", type=Path, default=Path("pipesched-out"), metavar="DIR",
                      help="directory for timeline.jsonl, trace.json, gantt.png (default ./pipesched-out)")
    demo.add_argument("--log-steps", type=_positive, default=1, metavar="N",
                      help="how many final steps to write to timeline.jsonl (default 1)")
    demo.set_defaults(run=_demo)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; every subcommand stores its handler as ``run``."""
    parser = _Parser(prog="pipesched", description="Pipeline-parallel training for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_schedule_commands(commands)
    _add_timeline_command(commands)
    _add_compare_command(commands)
    _add_demo_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn a :class:`CliError` into one line on stderr and status 2."""
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
    try:
        status = args.run(args)
    except CliError as error:
        print(f"pipesched {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pipesched {command}: interrupted", file=sys.stderr)
        return 130
    if args.command in ("demo", "compare"):  # under torchrun: leave the process group cleanly
        from pipesched.launch import finish_process_group

        finish_process_group()
    return status
