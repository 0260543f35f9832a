"""Median and spread of repeated measurements: what every table cell reports."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """``{"median", "min", "max", "q1", "q3", "n"}`` of ``values`` (quartiles: inclusive method)."""
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("summary of no values")
    if len(data) == 1:
        q1 = q3 = data[0]
    else:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return {
        "median": statistics.median(data),
        "min": data[0],
        "max": data[-1],
        "q1": q1,
        "q3": q3,
        "n": len(data),
    }


def fmt(s: dict[str, float | int], digits: int = 3, scale: float = 1.0) -> str:
    """``median [min..max]`` with ``digits`` decimals, values multiplied by ``scale``."""
    med, lo, hi = (float(s[k]) * scale for k in ("median", "min", "max"))
    if s["n"] == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{lo:.{digits}f}..{hi:.{digits}f}]"
