"""How busy the machine was *with other work* while a benchmark ran.

The benchmarks share a 2-core machine: a 2-rank pipeline needs both cores,
and anything else running takes them away. :class:`LoadMonitor` reads the
whole machine's busy CPU time (``/proc/stat``) and this process's own (plus its
waited-for children, i.e. the gloo peers once closed) before and after, so each
result says how many cores other processes used on average meanwhile.
"""

from __future__ import annotations

import os
import time


def _machine_busy_seconds() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMonitor:
    def __init__(self) -> None:
        self.start_wall = time.perf_counter()
        self.start_busy = _machine_busy_seconds()
        self.start_own = _own_seconds()
        self.loadavg_before = _loadavg()

    def finish(self) -> dict[str, object]:
        wall = time.perf_counter() - self.start_wall
        busy = _machine_busy_seconds()
        own = _own_seconds() - self.start_own
        others = None
        if busy is not None and self.start_busy is not None and wall > 0:
            others = max(0.0, (busy - self.start_busy - own) / wall)
        return {
            "wall_seconds": wall,
            "own_cpu_cores": own / wall if wall > 0 else None,
            "other_processes_cpu_cores": others,
            "cores": os.cpu_count(),
            "loadavg_before": self.loadavg_before,
            "loadavg_after": _loadavg(),
        }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def describe(load: dict[str, object]) -> str:
    others = load.get("other_processes_cpu_cores")
    own = load.get("own_cpu_cores")
    text = f"machine: this benchmark used {own:.2f} cores on average" if isinstance(own, float) else "machine:"
    if isinstance(others, float):
        text += f"; other processes used {others:.2f} of {load['cores']} cores meanwhile"
        if others > 0.25:
            text += " (shared machine: figures that need every core are pessimistic)"
    return text + f"; load average before {load['loadavg_before']}, after {load['loadavg_after']}"
