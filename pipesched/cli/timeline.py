"""``pipesched timeline LOG.jsonl``: analyse a logged step; export a Chrome trace or a Gantt chart."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipesched.cli.common import (
    CliError,
    export_timeline,
    json_dumps,
    non_negative,
    require_matplotlib,
    schedule_name,
)

def _timeline(args: argparse.Namespace) -> int:
    """Analyse one step of a JSON-lines log; optionally export a trace and a Gantt chart."""
    from pipesched.observe.timeline import Timeline

    if args.gantt is not None:
        require_matplotlib("--gantt")
    logs = args.log if len(args.log) > 1 else args.log[0]
    named = " ".join(map(str, args.log))
    try:
        timeline = Timeline.from_jsonl(logs, step=args.step)
        steps = [timeline] if args.step is not None else Timeline.steps_from_jsonl(logs)
    except FileNotFoundError as error:
        raise CliError(f"no such log file: {error.filename or named}") from None
    except OSError as error:  # a directory, no permission
        raise CliError(f"cannot read {error.filename or named}: {error.strerror or error}") from None
    except ValueError as error:  # not JSON, no task events, unknown --step
        raise CliError(f"{named}: {error}") from None
    try:
        analysis = timeline.analyze(args.what_if)
    except ValueError as error:  # the what-if schedule cannot run this timeline's shape
        raise CliError(f"--what-if {args.what_if}: {error}") from None
    written = export_timeline(timeline, args.chrome, args.gantt, steps)  # before printing: a bad path prints nothing else
    if args.json:
        print(json_dumps({"log": named, "step": timeline.step, **analysis.as_dict()}))
    else:
        logged = "" if len(steps) == 1 else f" (the last of {len(steps)} logged steps; --step N picks another)"
        print(f"log {named}, step {timeline.step if timeline.step is not None else '?'}{logged}")
        print(analysis.format_table())
    notes = sys.stderr if args.json else sys.stdout  # keep --json output parseable
    for line in written:
        print(line, file=notes)
    return 0


def add_command(commands: Any) -> None:
    timeline = commands.add_parser(
        "timeline", help="analyse a JSON-lines task log; export a Chrome trace or a Gantt PNG",
        description="Read one step of a structlog JSON-lines log (pipesched.configure_jsonl_logging, "
                    "or pipesched demo's timeline.jsonl) and say where the time went.",
    )
    timeline.add_argument("log", type=Path, nargs="+", metavar="LOG.jsonl",
                          help="the JSON-lines log; several (one per process of a torchrun job) are merged")
    timeline.add_argument("--step", type=non_negative, default=None, metavar="N",
                          help="which logged step to analyse and export (default: analyse the last one; "
                               "--chrome then writes every logged step)")
    timeline.add_argument("--chrome", type=Path, metavar="OUT.json",
                          help="write a Chrome/Perfetto trace here: every logged step (or --step N), step "
                               "boundaries and the gaps between steps marked")
    timeline.add_argument("--what-if", type=schedule_name, default=None, metavar="SCHEDULE",
                          help="also predict the step under another schedule's plan, replayed on the measured "
                               "task times (a prediction, shown apart from what was measured)")
    timeline.add_argument("--gantt", type=Path, metavar="OUT.png", help="write a Gantt chart PNG here (needs matplotlib)")
    timeline.add_argument("--json", action="store_true", help="print the analysis as JSON")
    timeline.set_defaults(run=_timeline)
