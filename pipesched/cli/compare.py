"""Run one built-in model under several schedules and measure each: ``pipesched compare``.

Same model, same weights, same batch, same CPU ranks for every schedule, so the
rows differ only by the schedule (and by the stage count it asks for:
interleaved 1F1B cuts the model into two stages per rank). Per schedule:

* a few warm-up steps (thread start-up, allocator, first-touch), then ``steps``
  timed ``pipe.step`` calls; the row reports the *median* step time, which
  shrugs off the odd slow step on a shared machine;
* the last step's timeline (:class:`pipesched.observe.timeline.Timeline`): measured
  bubble and runtime efficiency;
* the last step's report: peak in-flight micro-batches and peak activation
  bytes per rank;
* a gradient check on a float64 copy of the model: one pipelined step against
  ``loss_fn(model(x), y).backward()`` on the whole batch. float64 makes the
  only difference the order of summation, so a tight tolerance separates
  rounding from a real bug.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from pipesched.cli.common import (
    intra_op_threads,
)
from pipesched.distributed import DistributedPipeline
from pipesched.distributed.launch import init_process_group, launched_world
from pipesched.cli.models import residual_mlp, synthetic_classification
from pipesched.pipeline import Pipeline
from pipesched.plan.registry import get_schedule, schedules_for
from pipesched.observe.timeline import Timeline

__all__ = [
    "DEFAULT_SCHEDULES",
    "default_schedules",
    "GRAD_TOLERANCE",
    "MODELS",
    "BuiltinModel",
    "CompareConfig",
    "CompareConfigError",
    "CompareRow",
    "format_compare_table",
    "run_compare",
]

#: The order of the default list: the classic schedules first, then the split-backward family;
#: any other registered schedule (a plug-in) follows, by name.
DEFAULT_SCHEDULES = (
    "gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "zb-h1", "zb-v", "interleaved-zb", "dualpipe-v", "auto",
)


def default_schedules(ranks: int) -> list[str]:
    """Every registered schedule (aliases once, by canonical name) whose plan builds on ``ranks`` ranks.

    Why all of them: ``compare`` is where a user sees which schedule wins on
    their machine, and the zero-bubble family is only worth its memory if it
    is measured beside 1F1B. Whether the model has enough layers for a
    schedule's stage count is left to :func:`check_config`, which says which
    flag to change.
    """
    names = [name for name, _ in schedules_for(ranks)]
    known = [n for n in DEFAULT_SCHEDULES if n in names]
    return known + sorted(n for n in names if n not in DEFAULT_SCHEDULES)
#: Largest |pipelined - un-pipelined| parameter gradient (float64) that counts as equal.
GRAD_TOLERANCE = 1e-9


@dataclass(frozen=True)
class BuiltinModel:
    """A named model the CLI can build without user code: an ``nn.Sequential`` and its data shape."""

    name: str
    description: str
    build: Callable[[], nn.Sequential]
    features: int = 32
    classes: int = 10


MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel("mlp", "residual MLP, width 128, 8 blocks (11 layers)",
                     lambda: residual_mlp(width=128, blocks=8)),
        BuiltinModel("mlp-wide", "residual MLP, width 512, 8 blocks (11 layers)",
                     lambda: residual_mlp(width=512, blocks=8)),
        BuiltinModel("mlp-deep", "residual MLP, width 128, 24 blocks (27 layers)",
                     lambda: residual_mlp(width=128, blocks=24)),
    )
}


class CompareConfigError(ValueError):
    """A comparison the inputs cannot run (a user's mistake, not a bug); names the flag to change."""


@dataclass(frozen=True)
class CompareConfig:
    """What to compare. Field names match the CLI flags."""

    #: None: :func:`default_schedules` for ``ranks``.
    schedules: Sequence[str] | None = None
    model: str = "mlp"
    ranks: int = 2
    chunks: int = 8
    batch: int = 128
    steps: int = 10
    warmup: int = 2
    #: "never" by default, unlike ``Pipeline``: with recomputation the activation peak is
    #: set by the recompute, not by how many micro-batches the schedule keeps in flight.
    checkpoint: str = "never"
    seed: int = 0
    #: Intra-op threads per CPU rank; None: the cores per rank (what wins on CPU, see benchmarks/RESULTS.md).
    threads: int | None = None


@dataclass
class CompareRow:
    """One schedule's measurements (seconds, fractions in 0..1, bytes)."""

    schedule: str
    model: str
    ranks: int
    stages: int
    chunks: int
    batch: int
    steps: int
    samples_per_s: float
    step_time_s: float
    bubble_over_total: float
    bubble_over_ideal: float
    runtime_efficiency: float | None
    schedule_efficiency: float | None
    peak_inflight: list[int] = field(default_factory=list)
    peak_activation_bytes: list[int] = field(default_factory=list)
    #: Summed over ranks, last step: time in backward tasks (B: the whole backward where the
    #: schedule does not split it, the input-gradient half where it does) and in W tasks.
    backward_time_s: float = 0.0
    weight_time_s: float = 0.0
    grads_match: bool = False
    grad_max_abs_diff: float = 0.0
    #: Intra-op threads each rank's worker used.
    threads_per_rank: int = 0
    #: Layers per stage, as the pipeline cut the model.
    balance: list[int] = field(default_factory=list)
    #: ``--what-if``: the step time the tuner's model predicts for this schedule (profile + simulator).
    predicted_step_s: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def check_config(config: CompareConfig) -> BuiltinModel:
    """Refuse, before any work, what cannot run; returns the chosen model."""
    model = MODELS.get(config.model)
    if model is None:
        raise CompareConfigError(f"unknown --model {config.model!r}; choose one of {', '.join(MODELS)}")
    if config.chunks > config.batch:
        raise CompareConfigError(
            f"--chunks {config.chunks} is more than --batch {config.batch}; every micro-batch "
            f"needs a row: lower --chunks or raise --batch"
        )
    layers = len(model.build())
    for name in _schedules(config):
        stages = _stages(name, config.ranks)
        if stages > layers:
            raise CompareConfigError(
                f"schedule {name!r} on {config.ranks} ranks needs {stages} stages, but model "
                f"{model.name!r} has {layers} layers; lower --ranks or pick a deeper --model "
                f"(e.g. mlp-deep)"
            )
    return model


def _schedules(config: CompareConfig) -> list[str]:
    return list(config.schedules) if config.schedules is not None else default_schedules(config.ranks)


def _stages(schedule: str, ranks: int) -> int:
    return get_schedule(schedule).default_num_stages(ranks)


def run_compare(config: CompareConfig, progress: Callable[[str], None] | None = None) -> list[CompareRow]:
    """Measure every schedule of ``config``; ``progress`` hears one line per schedule."""
    spec = check_config(config)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads_per_rank(config))  # before the pipelines: their workers read it
    try:
        return _run(config, spec, progress)
    finally:
        torch.set_num_threads(previous)


def threads_per_rank(config: CompareConfig) -> int:
    """``config.threads``, else the cores each rank gets (all ranks are threads of this process
    outside torchrun; one per process under it)."""
    return intra_op_threads(config.threads, 1 if launched_world() > 1 else config.ranks)


def _run(
    config: CompareConfig, spec: BuiltinModel, progress: Callable[[str], None] | None
) -> list[CompareRow]:
    torch.manual_seed(config.seed)
    base = spec.build()
    x, y = synthetic_classification(config.batch, features=spec.features, classes=spec.classes, seed=config.seed)
    reference = _reference_grads(base, x, y)
    rows = []
    for name in _schedules(config):
        if progress is not None:
            progress(f"{name}: {config.warmup} warm-up + {config.steps} timed steps ...")
        rows.append(_measure(name, config, base, x, y, reference))
    return rows


def _pipeline(model: nn.Sequential, schedule: str, config: CompareConfig) -> Pipeline | DistributedPipeline:
    """The pipeline every measurement uses; a shape the schedule refuses is the user's to fix.

    Under torchrun (``WORLD_SIZE`` > 1) each process is one rank of a
    :class:`DistributedPipeline` over the same model; otherwise all ranks are
    threads of one process.
    """
    try:
        if launched_world() > 1:
            init_process_group()
            return DistributedPipeline(model, schedule=schedule, chunks=config.chunks,
                                       checkpoint=config.checkpoint, loss_fn=nn.CrossEntropyLoss(),
                                       gather_timeline=True)  # the analysis reads every rank's tasks
        return Pipeline(model, schedule=schedule, devices=["cpu"] * config.ranks, chunks=config.chunks,
                        checkpoint=config.checkpoint, loss_fn=nn.CrossEntropyLoss())
    except ValueError as error:
        raise CompareConfigError(f"schedule {schedule!r}: {error}") from None


def _measure(
    name: str, config: CompareConfig, base: nn.Sequential, x: Tensor, y: Tensor, reference: list[Tensor]
) -> CompareRow:
    model = copy.deepcopy(base)
    times = []
    with _pipeline(model, name, config) as pipe:
        for step in range(config.warmup + config.steps):
            model.zero_grad(set_to_none=True)
            began = time.perf_counter()
            pipe.step(x, y)
            if step >= config.warmup:
                times.append(time.perf_counter() - began)
        report = pipe.last_report
    assert report is not None  # set by every step
    analysis = Timeline.from_report(report).analyze()
    matches, diff = _grads_match(name, config, base, x, y, reference)
    median = statistics.median(times)
    return CompareRow(
        schedule=report.schedule,
        model=config.model,
        ranks=report.num_ranks,
        stages=report.num_stages,
        chunks=report.num_microbatches,
        batch=config.batch,
        steps=config.steps,
        samples_per_s=config.batch / median if median > 0 else float("inf"),
        step_time_s=median,
        bubble_over_total=analysis.bubble_over_total,
        bubble_over_ideal=analysis.bubble_over_ideal,
        runtime_efficiency=analysis.runtime_efficiency,
        schedule_efficiency=analysis.schedule_efficiency,
        peak_inflight=list(report.peak_inflight),
        peak_activation_bytes=list(report.peak_activation_bytes),
        backward_time_s=sum(t.duration for t in report.tasks if t.kind == "B"),
        weight_time_s=sum(t.duration for t in report.tasks if t.kind == "W"),
        grads_match=matches,
        grad_max_abs_diff=diff,
        threads_per_rank=torch.get_num_threads(),
        balance=list(pipe.balance),
    )


def _reference_grads(base: nn.Sequential, x: Tensor, y: Tensor) -> list[Tensor]:
    """float64 gradients of the un-pipelined model on the whole batch: the ground truth."""
    model = copy.deepcopy(base).double()
    nn.CrossEntropyLoss()(model(x.double()), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]


def _grads_match(
    name: str, config: CompareConfig, base: nn.Sequential, x: Tensor, y: Tensor, reference: list[Tensor]
) -> tuple[bool, float]:
    """One float64 pipelined step; True when every gradient is within :data:`GRAD_TOLERANCE`."""
    model = copy.deepcopy(base).double()
    with _pipeline(model, name, config) as pipe:
        pipe.step(x.double(), y)
        owned = {id(p) for p in pipe.parameters()}  # all of them in one process; this rank's otherwise
    worst = 0.0
    for param, expected in zip(model.parameters(), reference):
        if id(param) not in owned:
            continue
        if param.grad is None:
            worst = float("inf")
            break
        worst = max(worst, (param.grad - expected).abs().max().item())
    if launched_world() > 1:  # every rank checked its own stages: the verdict is the worst of all
        import torch.distributed as dist

        figure = torch.tensor([worst], dtype=torch.float64)
        dist.all_reduce(figure, op=dist.ReduceOp.MAX)
        worst = figure.item()
    return worst <= GRAD_TOLERANCE, worst


def format_compare_table(rows: Sequence[CompareRow], config: CompareConfig) -> str:
    """One line of context, one row per schedule, and what the columns mean."""
    spec = MODELS[config.model]
    header = (
        f"model {spec.name} ({spec.description}), {config.ranks} CPU ranks, batch {config.batch} "
        f"in {config.chunks} micro-batches, {config.warmup} warm-up + {config.steps} timed steps, "
        f"checkpoint {config.checkpoint}, {threads_per_rank(config)} intra-op thread(s) per rank"
    )
    columns = ["schedule", "stages", "samples/s", "step (median)", "B / W ms", "bubble", "runtime eff.",
               "peak in-flight", "peak activations", "grads match"]
    table = [
        [
            row.schedule,
            str(row.stages),
            f"{row.samples_per_s:,.0f}",
            f"{row.step_time_s * 1e3:.1f} ms",
            f"{row.backward_time_s * 1e3:.1f} / " + (f"{row.weight_time_s * 1e3:.1f}" if row.weight_time_s else "-"),
            _percent(row.bubble_over_total),
            _percent(row.runtime_efficiency),
            ",".join(map(str, row.peak_inflight)),
            ",".join(_bytes(b) for b in row.peak_activation_bytes),
            "yes" if row.grads_match else "NO",
        ]
        for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    lines = [header, "", "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines += [
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in table
    ]
    lines += [
        "",
        ("B / W ms: time in backward tasks / in weight-gradient (W) tasks, summed over ranks, last step; "
         "a schedule that splits the backward runs input gradients in B and parameter gradients in W, "
         "the others run the whole backward in B (W: -);"),
        ("bubble: idle / (ranks x makespan) of the last step; runtime eff.: the same plan replayed on the "
         "measured task times / measured makespan;"),
        ("peak in-flight and peak activations: per rank (rank 0 first); grads match: float64 pipelined "
         f"gradients within {GRAD_TOLERANCE:g} of the un-pipelined model's."),
    ]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f} %"


def _bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
