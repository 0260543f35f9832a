"""``pipesched timeline LOG.jsonl``: analyse a logged step; export a Chrome trace or a Gantt chart."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipesched.cli.common import CliError, export_timeline, json_dumps, non_negative, require_matplotlib

def _timeline(args: argparse.Namespace) -> int:
    """Analyse one step of a JSON-lines log; optionally export a trace and a Gantt chart."""
    from pipesched.observe.timeline import Timeline

    if args.gantt is not None:
        require_matplotlib("--gantt")
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
        print(json_dumps({"log": named, "step": timeline.step, **analysis.as_dict()}))
    else:
        print(f"log {named}, step {timeline.step if timeline.step is not None else '?'}")
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
                          help="which logged step to analyse (default: the last one)")
    timeline.add_argument("--chrome", type=Path, metavar="OUT.json", help="write a Chrome/Perfetto trace here")
    timeline.add_argument("--gantt", type=Path, metavar="OUT.png", help="write a Gantt chart PNG here (needs matplotlib)")
    timeline.add_argument("--json", action="store_true", help="print the analysis as JSON")
    timeline.set_defaults(run=_timeline)
