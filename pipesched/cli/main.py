"""The command line: ``pipesched schedule show|list``, ``timeline``, ``compare``, ``demo``, ``tune``.

One module per command (:mod:`~pipesched.cli.schedule`, :mod:`~pipesched.cli.timeline`,
:mod:`~pipesched.cli.compare`, :mod:`~pipesched.cli.demo`), each adding its
parser with ``add_command``; what they share is in :mod:`~pipesched.cli.common`.
A command module is imported only when its command runs, so ``pipesched
schedule show`` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipesched.cli.common import CliError, Parser

__all__ = ["build_parser", "main"]

#: command -> module with ``add_command(commands)``
COMMANDS = {
    "schedule": "pipesched.cli.schedule",
    "timeline": "pipesched.cli.timeline",
    "compare": "pipesched.cli.compare_command",
    "demo": "pipesched.cli.demo",
    "tune": "pipesched.cli.tune",
}

def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; every subcommand stores its handler as ``run``."""
    parser = Parser(prog="pipesched", description="Pipeline-parallel training for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_command(commands)
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
        from pipesched.distributed.launch import finish_process_group

        finish_process_group()
    return status
