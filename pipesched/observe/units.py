"""Human-readable seconds, shares and byte counts for tables and charts."""

from __future__ import annotations


def seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 1.0:
        return f"{value:.3f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3f} ms"
    return f"{value * 1e6:.1f} us"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f} %"


def nbytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"
