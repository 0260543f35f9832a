"""``pipesched demo``'s body: train the built-in model, then leave a log, a trace and a Gantt chart.

Kept apart from :mod:`pipesched.cli` (which parses and dispatches) so each
file reads in one sitting. It is part of the command line: user mistakes raise
:class:`pipesched.cli.CliError`, which ``main`` prints as one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipesched.cli.common import (
    PLOT_HINT,
    CliError,
    export_timeline,
    intra_op_threads,
    matplotlib_missing,
    positive,
    resolve_ranks,
    schedule_name,
)
from pipesched.distributed.launch import launched_world

__all__ = ["Progress", "run_demo"]


class Progress:
    """tqdm when it is installed and stderr is a terminal; else one line every ~10 % of the steps.

    tqdm is optional on purpose: the plain lines need nothing, read well in CI
    logs (a redrawn bar does not), and pipesched stays free of a dependency
    for a cosmetic feature.
    """

    def __init__(self, total: int):
        self.total = total
        self.every = max(1, total // 10)
        self.bar = _tqdm_bar(total) if sys.stderr.isatty() else None

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
        elif step == 1 or step % self.every == 0 or step == self.total:
            print(f"  step {step:4d}/{self.total}  loss {loss:.4f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tqdm_bar(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="step", desc="training", file=sys.stderr)


def check_demo_args(args: argparse.Namespace) -> None:
    """Refuse shapes the model cannot take, naming the flags, before building anything."""
    from pipesched.plan.registry import get_schedule

    if args.log_steps > args.steps:
        raise CliError(f"--log-steps {args.log_steps} is more than --steps {args.steps}; lower it")
    if args.chunks > args.batch:
        raise CliError(f"--chunks {args.chunks} is more than --batch {args.batch}; lower --chunks")
    stages = get_schedule(args.schedule).default_num_stages(args.ranks)
    layers = args.blocks + 3  # input projection, the blocks, norm, head
    if stages > layers:
        raise CliError(
            f"schedule {args.schedule!r} on --ranks {args.ranks} needs {stages} stages, but the model has "
            f"{layers} layers (--blocks {args.blocks} + 3); raise --blocks to {stages - 3} or lower --ranks"
        )


def _out_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"cannot create --out {path}: {error.strerror or error}") from None
    return path


def run_demo(args: argparse.Namespace) -> int:
    """Train, log the last ``--log-steps`` steps, evaluate, and write the outputs into ``--out``.

    Under torchrun each process is one rank of a DistributedPipeline: every
    rank logs its own ``timeline-rank{r}.jsonl``; rank 0 prints, merges the
    logs (same host) and writes the trace and chart.
    """
    import torch

    previous = torch.get_num_threads()
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(previous)  # the caller's process is left as it was found


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from pipesched.cli.models import residual_mlp, synthetic_classification

    lead = resolve_ranks(args)
    check_demo_args(args)
    out = _out_dir(args.out)
    torch.manual_seed(args.seed)
    x, y = synthetic_classification(args.samples, seed=args.seed)
    model = residual_mlp(blocks=args.blocks)
    distributed = launched_world() > 1
    threads = intra_op_threads(args.threads, 1 if distributed else args.ranks)
    torch.set_num_threads(threads)  # before the pipeline: each rank's worker reads it at its first op
    say = print if lead else (lambda *a, **k: None)
    say(
        f"pipesched demo: residual MLP ({args.blocks} blocks), schedule {args.schedule}, "
        f"{args.ranks} CPU ranks{' (one process each)' if distributed else ''}, "
        f"{threads} intra-op thread(s) per rank, {args.chunks} micro-batches, {args.steps} steps"
    )
    began = time.perf_counter()
    with _demo_pipeline(model, args, distributed) as pipe:
        optimizer = torch.optim.AdamW(pipe.parameters(), lr=3e-3)

        def train_step() -> float:
            rows = torch.randint(0, args.samples, (args.batch,))
            optimizer.zero_grad()
            loss = pipe.step(x[rows], y[rows])
            optimizer.step()
            return loss.item()

        log = out / (f"timeline-rank{pipe.rank}.jsonl" if distributed else "timeline.jsonl")
        last_loss = train(train_step, args.steps, args.log_steps, log, show=lead)
        report = pipe.last_report  # the last training step; the evaluation below replaces it
        if not distributed:
            with torch.no_grad():
                model.eval()
                accuracy = (pipe(x).argmax(1) == y).float().mean().item()
    elapsed = time.perf_counter() - began
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # every rank's log is complete before rank 0 reads them
        if not lead:
            return 0
        print(f"final loss {last_loss:.4f}  ({elapsed:.1f} s, {args.steps * args.batch / elapsed:,.0f} samples/s)")
        logs = sorted(out.glob("timeline-rank*.jsonl"))
        _write_outputs(report, out, logs, args.log_steps)
        return 0
    print(f"accuracy on the training set: {accuracy:.1%}  ({elapsed:.1f} s, "
          f"{args.steps * args.batch / elapsed:,.0f} samples/s)")
    print(f"placement (stage -> rank): {report.placement}")
    _write_outputs(report, out, [log], args.log_steps)
    return 0


def _demo_pipeline(model: Any, args: argparse.Namespace, distributed: bool) -> Any:
    from torch import nn

    if distributed:
        from pipesched.distributed import DistributedPipeline

        return DistributedPipeline(model, schedule=args.schedule, chunks=args.chunks,
                                   loss_fn=nn.CrossEntropyLoss(), gather_timeline=True)  # report: every rank
    from pipesched.pipeline import Pipeline

    return Pipeline(model, schedule=args.schedule, devices=["cpu"] * args.ranks,
                    chunks=args.chunks, loss_fn=nn.CrossEntropyLoss())


def train(train_step: Callable[[], float], steps: int, log_steps: int, log: Path, show: bool = True) -> float:
    """Run ``steps`` steps with a progress display; the last ``log_steps`` go to the JSON-lines ``log``.

    structlog is configured only around the logged steps and reset after
    (``structlog.reset_defaults()``), so the other steps and the evaluation
    log nothing and the process is left as it was found.
    """
    import structlog

    from pipesched.observe.timeline import configure_jsonl_logging

    progress, file, loss = Progress(steps) if show else None, None, float("nan")
    try:
        for step in range(1, steps + 1):
            if step == steps - log_steps + 1:
                try:
                    file = configure_jsonl_logging(log, mode="w")
                except OSError as error:
                    raise CliError(f"cannot write {log}: {error.strerror or error}") from None
            loss = train_step()
            if progress is not None:
                progress.update(step, loss)
    finally:
        if progress is not None:
            progress.close()
        if file is not None:
            file.close()
            structlog.reset_defaults()
    return loss


def _write_outputs(report: Any, out: Path, logs: list[Path], log_steps: int) -> None:
    """Print the last step's analysis; write its trace and Gantt chart next to the log(s).

    With several logs (one per process) the timeline is read back from them,
    merged, so the trace shows every rank and its communication.
    """
    from pipesched.observe.timeline import Timeline

    timeline = Timeline.from_report(report) if len(logs) == 1 else Timeline.from_jsonl(logs)
    steps = Timeline.steps_from_jsonl(logs[0] if len(logs) == 1 else logs)  # the trace shows every logged step
    print()
    print(timeline.analyze().format_table())
    print()
    named = " ".join(map(str, logs))
    print(f"wrote {named}  (the last {log_steps} step(s) as JSON lines; "
          f"analyse again with: pipesched timeline {named})")
    gantt = None if matplotlib_missing() else out / "gantt.png"
    for line in export_timeline(timeline, out / "trace.json", gantt, steps):
        print(line)
    if gantt is None:
        print(f"skipped the Gantt chart: matplotlib is not installed; {PLOT_HINT}")


# ------------------------------------------------------------------ command


def add_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="train a small built-in model on CPU through the pipeline",
        description="Train the residual MLP on synthetic data, then write the last steps' timeline log, "
                    "a Chrome trace and a Gantt chart into --out.",
    )
    demo.add_argument("--schedule", type=schedule_name, default="1f1b", metavar="NAME", help="schedule name (default 1f1b)")
    demo.add_argument("--ranks", type=positive, default=None, metavar="R",
                      help="CPU ranks (default 2; under torchrun: one per process)")
    demo.add_argument("--chunks", type=positive, default=4, metavar="M", help="micro-batches per batch (default 4)")
    demo.add_argument("--steps", type=positive, default=200, metavar="N", help="training steps (default 200)")
    demo.add_argument("--batch", type=positive, default=64, metavar="B", help="batch size (default 64)")
    demo.add_argument("--blocks", type=positive, default=8, metavar="N", help="residual blocks (default 8)")
    demo.add_argument("--samples", type=positive, default=4096, metavar="N", help="dataset size (default 4096)")
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    demo.add_argument("--threads", type=positive, default=None, metavar="N",
                      help="intra-op threads per rank (default: cores // ranks, at least 1)")
    demo.add_argument("--out", type=Path, default=Path("pipesched-out"), metavar="DIR",
                      help="directory for timeline.jsonl, trace.json, gantt.png (default ./pipesched-out)")
    demo.add_argument("--log-steps", type=positive, default=1, metavar="N",
                      help="how many final steps to write to timeline.jsonl (default 1)")
    demo.set_defaults(run=run_demo)
