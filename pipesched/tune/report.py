"""The tuner's ranked table, and byte sizes as people read them (``512KiB``, ``2GiB``) both ways."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["format_bytes", "format_table", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "t": 1000**4, "tb": 1000**4}


def parse_bytes(text: str) -> int:
    """``"2GiB"`` → 2147483648, ``"512KiB"``, ``"1.5MB"``, ``"1000"``; ValueError naming the forms accepted."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"expected a byte size such as 1000000, 512KiB, 2GiB or 1.5GB, got {text!r}")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"expected a byte size > 0, got {text!r}")
    return int(value)


def format_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def format_table(result: Any, top: int | None = 10) -> str:
    """One row per candidate, best first; ``top`` rows (``None``: all), then the winning ``Pipeline(...)`` line."""
    rows = result.candidates if top is None else result.candidates[:top]
    columns = ["#", "schedule", "chunks", "checkpoint", "balance", "predicted", "measured", "pred/meas",
               "peak/rank (max)", "fits"]
    table = [
        [str(i + 1), c.schedule if c.pipelined else "none (no pipeline)", str(c.chunks), c.checkpoint,
         ",".join(map(str, c.balance)), f"{c.predicted_step_s * 1e3:.1f} ms",
         "-" if c.measured_step_s is None else
         f"{c.measured_step_s * 1e3:.1f} ms ±{100 * (c.measured_spread or 0) / 2:.0f}%",
         "-" if c.prediction_error is None else
         f"{1 + c.prediction_error:.2f}" + (" !" if abs(c.prediction_error) > 0.15 else ""),
         format_bytes(max(c.predicted_peak_bytes)), "yes" if c.fits else "NO"]
        for i, c in enumerate(rows)
    ]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(columns)]
    budget = "no memory budget" if result.memory_budget is None else \
        f"memory budget {format_bytes(result.memory_budget)} per rank"
    lines = [f"{len(result.candidates)} candidates for a batch of {result.batch} rows, {budget}"
             + (f"; showing the best {len(rows)}" if len(rows) < len(result.candidates) else ""), ""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(columns, widths)).rstrip())
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    lines += [
        "",
        "predicted: the simulator's step time on the profiled per-layer costs"
        + (f" + {result.overhead_s * 1e6:.0f} us of engine per task" if getattr(result, "overhead_s", 0) else "")
        + "; measured: median of real steps, interleaved (--measure), ± half the spread; "
        "pred/meas: '!' beyond 15 %; none: the model without a pipeline (chunks > 1: gradient accumulation); "
        "peak/rank: predicted activations + parameters + gradients of the busiest rank.",
        "",
        "best: " + result.best.pipeline_line(),
    ]
    spreads = [p.spread for p in getattr(result, "profiles", {}).values()]
    if spreads:
        lines.append(f"profile spread (slowest - fastest run / median, median over layers): "
                     f"{100 * max(spreads):.0f} % at worst; intra-op threads per rank while measuring: "
                     f"{getattr(result, 'threads', None) or '-'}")
    if getattr(result, "advice", None):
        lines.append(result.advice)
    return "\n".join(lines)
