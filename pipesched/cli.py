"""The command line: ``pipesched demo`` and friends.

Errors in user input print one line and exit with status 2 (argparse's
convention); no traceback for a user's mistake.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from pipesched.models import residual_mlp, synthetic_classification
from pipesched.pipeline import Pipeline
from pipesched.registry import list_schedules


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _schedule(text: str) -> str:
    if text.lower() not in list_schedules():
        raise argparse.ArgumentTypeError(
            f"unknown schedule {text!r}; available: {', '.join(list_schedules())}"
        )
    return text


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    x, y = synthetic_classification(args.samples, seed=args.seed)
    model = residual_mlp(blocks=args.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(
        f"pipesched demo: residual MLP ({args.blocks} blocks), schedule {args.schedule}, "
        f"{args.ranks} CPU ranks, {args.chunks} micro-batches, {args.steps} steps"
    )
    began = time.perf_counter()
    with Pipeline(model, schedule=args.schedule, devices=["cpu"] * args.ranks,
                  chunks=args.chunks, loss_fn=nn.CrossEntropyLoss()) as pipe:
        for step in range(1, args.steps + 1):
            rows = torch.randint(0, args.samples, (args.batch,))
            optimizer.zero_grad()
            loss = pipe.step(x[rows], y[rows])
            optimizer.step()
            if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
                print(f"  step {step:4d}  loss {loss.item():.4f}")
        with torch.no_grad():
            model.eval()
            accuracy = (pipe(x).argmax(1) == y).float().mean().item()
        report = pipe.last_report
    elapsed = time.perf_counter() - began
    print(f"accuracy on the training set: {accuracy:.1%}  ({elapsed:.1f} s, "
          f"{args.steps * args.batch / elapsed:,.0f} samples/s)")
    print(f"placement (stage -> rank): {report.placement}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipesched", description="Pipeline-parallel training for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="train a small built-in model on CPU through the pipeline")
    demo.add_argument("--schedule", type=_schedule, default="1f1b", help="schedule name (default 1f1b)")
    demo.add_argument("--ranks", type=_positive, default=2, help="CPU ranks (default 2)")
    demo.add_argument("--chunks", type=_positive, default=4, help="micro-batches per batch (default 4)")
    demo.add_argument("--steps", type=_positive, default=200, help="training steps (default 200)")
    demo.add_argument("--batch", type=_positive, default=64, help="batch size (default 64)")
    demo.add_argument("--blocks", type=_positive, default=8, help="residual blocks (default 8)")
    demo.add_argument("--samples", type=_positive, default=4096, help="dataset size (default 4096)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError) as error:
        print(f"pipesched {args.command}: error: {error}", file=sys.stderr)
        return 2
