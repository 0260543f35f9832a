"""``pipesched compare --what-if``: per schedule, the step time the planner predicts beside the measured one.

``"auto"`` and ``pipesched.tune`` choose by prediction: the model's layers
profiled at the micro-batch size (:func:`pipesched.profile`), the engine's
cost per task (:func:`pipesched.tune.overhead.engine_overhead`), the plan
replayed by the simulator (:func:`pipesched.tune.predict.predict`). This table
puts that prediction next to what ``compare`` measured for the same schedule,
balance and micro-batches, so a user sees where the model of the machine is
wrong before trusting a ranking built on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pipesched.cli.compare import MODELS, CompareConfig, CompareRow
from pipesched.cli.models import synthetic_classification
from pipesched.plan.registry import get_schedule
from pipesched.runtime.cpu_threads import intra_op_threads
from pipesched.runtime.microbatch import split_sizes
from pipesched.tune.measure import _profile
from pipesched.tune.overhead import engine_overhead
from pipesched.tune.predict import predict

__all__ = ["format_what_if", "predict_rows"]

#: |predicted - measured| / measured beyond which a row is flagged.
TOLERANCE = 0.15


def predict_rows(rows: Sequence[CompareRow], config: CompareConfig, threads: int) -> None:
    """Set ``predicted_step_s`` of every row, measuring with ``threads`` intra-op threads (as the run did)."""
    spec = MODELS[config.model]
    model = spec.build()
    x, y = synthetic_classification(config.batch, features=spec.features, classes=spec.classes, seed=config.seed)
    sizes = split_sizes(config.batch, config.chunks)
    with intra_op_threads(threads):
        profiles = {size: _profile(model, x[:size], y[:size], nn.CrossEntropyLoss(), device="cpu", repeat=5,
                                   timeout=None, progress=None) for size in sorted(set(sizes))}
        overhead = engine_overhead(["cpu"] * config.ranks)
    for row in rows:
        schedule = get_schedule(row.schedule)
        guess = predict(schedule, row.balance, row.ranks, sizes, profiles, config.checkpoint, overhead)
        row.predicted_step_s = guess.step_s


def format_what_if(rows: Sequence[CompareRow]) -> str:
    """One row per schedule: predicted, measured, their ratio, flagged beyond :data:`TOLERANCE`."""
    columns = ["schedule", "balance", "predicted", "measured", "pred/meas", ""]
    table = []
    for row in rows:
        predicted = row.predicted_step_s
        ratio = None if predicted is None or row.step_time_s <= 0 else predicted / row.step_time_s
        table.append([
            row.schedule, ",".join(map(str, row.balance)),
            "-" if predicted is None else f"{predicted * 1e3:.1f} ms", f"{row.step_time_s * 1e3:.1f} ms",
            "-" if ratio is None else f"{ratio:.2f}",
            "" if ratio is None or abs(ratio - 1) <= TOLERANCE else
            ("predicted too fast" if ratio < 1 else "predicted too slow"),
        ])
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    lines = ["what-if: the planner's prediction (profile + engine cost per task + simulator) against the measured "
             "median step", ""]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    measured = min(rows, key=lambda r: r.step_time_s)
    guessed = [r for r in rows if r.predicted_step_s is not None]
    if guessed:
        picked = min(guessed, key=lambda r: r.predicted_step_s)  # type: ignore[arg-type,return-value]
        lines += ["", f"fastest predicted: {picked.schedule}; fastest measured: {measured.schedule}"
                  + ("" if picked is measured else
                     f" (the prediction's pick measured {picked.step_time_s / measured.step_time_s:.2f}x the best)")]
    return "\n".join(lines)
