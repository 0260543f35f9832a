"""What the commands share: the one-line error convention, value parsers, exports, torchrun ranks.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

class CliError(Exception):
    """A user's mistake, already worded for the terminal: ``main`` prints it and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a parse error is one line (no usage block) pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- value types


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def cost(minimum_exclusive: bool) -> Callable[[str], float]:
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


def schedule_name(text: str) -> str:
    from pipesched.plan.registry import list_schedules

    if text.strip().lower() not in list_schedules():
        raise argparse.ArgumentTypeError(
            f"unknown schedule {text!r}; available: {', '.join(list_schedules())}"
        )
    return text.strip().lower()


def schedule_list(text: str) -> list[str]:
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated schedule names, e.g. gpipe,1f1b")
    return list(dict.fromkeys(schedule_name(name) for name in names))


def export_timeline(timeline: Any, chrome: Path | None, gantt: Path | None, steps: list[Any] | None = None) -> list[str]:
    """Write the requested files; returns one "wrote ..." line for each.

    The Chrome trace holds ``steps`` (timelines of several steps, on one
    clock) when given, else ``timeline``; the Gantt chart is ``timeline``'s.
    """
    from pipesched.observe.export import chrome_trace_steps

    lines = []
    if chrome is not None:
        traced = steps or [timeline]
        write_file(lambda: chrome_trace_steps(traced, chrome), chrome)
        what = "1 step" if len(traced) == 1 else f"{len(traced)} steps and the gaps between them"
        lines.append(f"wrote {chrome}  (Chrome/Perfetto trace of {what}: open it at https://ui.perfetto.dev)")
    if gantt is not None:
        write_file(lambda: timeline.to_gantt_png(gantt), gantt)
        lines.append(f"wrote {gantt}  (Gantt chart of step {timeline.step if timeline.step is not None else '?'}, "
                     f"one row per rank)")
    return lines


def write_file(action: Callable[[], object], path: Path) -> None:
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


def require_matplotlib(flag: str) -> None:
    if matplotlib_missing():
        raise CliError(f"{flag} needs matplotlib, which is not installed: {PLOT_HINT}")


def intra_op_threads(requested: int | None, ranks_here: int) -> int:
    """The intra-op thread count for a CPU pipeline with ``ranks_here`` ranks in this process.

    ``requested`` when given; else the cores per rank (this process's ranks
    and the other local processes of a torchrun job share the cores): on CPU,
    ranks with torch's default thread count fight for the same cores, which
    measured about 0.6x as fast as one thread per rank (benchmarks/RESULTS.md, "When a CPU pipeline pays").
    """
    if requested is not None:
        return requested
    from pipesched.runtime.cpu_threads import cores_per_rank, local_processes

    return cores_per_rank(ranks_here * local_processes())


def json_dumps(value: object) -> str:
    import json

    return json.dumps(value, indent=2, allow_nan=True)


def resolve_ranks(args: argparse.Namespace) -> bool:
    """Settle ``args.ranks``: torchrun's process count, else the flag (default 2).

    Under torchrun the process group is joined here. Returns whether this
    process prints (rank 0, or the only process).
    """
    from pipesched.distributed.launch import init_process_group, launched_world

    world = launched_world()
    if world == 1:
        args.ranks = args.ranks or 2
        return True
    if args.ranks not in (None, world):
        raise CliError(f"--ranks {args.ranks} conflicts with the {world} processes torchrun started; drop --ranks")
    args.ranks = world
    rank, _ = init_process_group()
    return rank == 0
