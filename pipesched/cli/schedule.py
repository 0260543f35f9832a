"""``pipesched schedule show|list``: a plan charted on a time grid by the simulator, or the names."""

from __future__ import annotations

import argparse
from typing import Any

from pipesched.cli.common import CliError, cost, positive, schedule_name

def _schedule_show(args: argparse.Namespace) -> int:
    """Chart the plan on a time grid from the simulator, then its makespan, bubble and bound."""
    from pipesched.plan.chart import (
        PlanError,
        build_chart,
        format_chart,
        format_summary,
    )

    try:
        chart = build_chart(args.name, args.stages, args.microbatches, args.ranks,
                            args.forward_cost, args.backward_cost, args.comm, args.weight_cost)
    except PlanError as error:
        raise CliError(f"{error} (--stages {args.stages}, --ranks {args.ranks or 'default'})") from None
    print(format_chart(chart))
    print()
    print(format_summary(chart))
    return 0


def schedule_list_command(args: argparse.Namespace) -> int:
    from pipesched.plan.registry import list_schedules

    print("\n".join(list_schedules()))
    return 0


def add_command(commands: Any) -> None:
    schedule = commands.add_parser("schedule", help="inspect schedules without running a model")
    actions = schedule.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show", help="chart a schedule's plan on a time grid and simulate it",
        description="Chart NAME's plan, one row per rank, actions placed in time by the simulator "
                    "(default: unit costs, F = B = 1, and W = B for a schedule that splits backwards), "
                    "then its makespan, bubble, peak in-flight micro-batches and lower bound.",
    )
    show.add_argument("name", type=schedule_name, metavar="NAME", help="schedule name (see: pipesched schedule list)")
    show.add_argument("--stages", type=positive, required=True, metavar="S", help="number of stages S")
    show.add_argument("--microbatches", type=positive, required=True, metavar="M", help="micro-batches per batch M")
    show.add_argument("--ranks", type=positive, default=None, metavar="R",
                      help="ranks R (default: the schedule's own count: S for gpipe/1f1b/zb-h1, S/2 for "
                           "interleaved, looped-bfs, zb-v and dualpipe-v)")
    show.add_argument("--forward-cost", type=cost(True), default=1.0, metavar="F", help="cost of one forward (default 1)")
    show.add_argument("--backward-cost", type=cost(True), default=1.0, metavar="B",
                      help="cost of one backward, or of its input-gradient part when backwards are split "
                           "or --weight-cost is given (default 1)")
    show.add_argument("--weight-cost", type=cost(True), default=None, metavar="W",
                      help="cost of a split backward's weight-gradient pass W; a backward the plan does not "
                           "split then costs B + W (default: B for a schedule that splits backwards, else "
                           "none; give the same W to compare a zero-bubble schedule with 1f1b)")
    show.add_argument("--comm", type=cost(False), default=0.0, metavar="C",
                      help="cost added to every cross-rank dependency (default 0)")
    show.set_defaults(run=_schedule_show)
    listing = actions.add_parser("list", help="print every registered schedule name")
    listing.set_defaults(run=schedule_list_command)
