"""Time budgets: the whole run ends inside its budget, each item inside its share.

Device time is scarce (a quarter of an hour per session, start-up included),
so the run is planned to end on time rather than to finish everything: items
run in order of value, each gets a share of what is left when it starts (time
an earlier item did not use rolls over), and a measurement that would not fit
its item's deadline is skipped and reported as skipped. A watchdog ends the
process if a single measurement overruns everything, after the results so
far are written.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable


class Budget:
    """A deadline ``total_s`` seconds from now."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.total_s = float(total_s)
        self.start = clock()
        self.deadline = self.start + self.total_s

    def left(self) -> float:
        return self.deadline - self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def share(self, weight: float, weights_left: float) -> ItemBudget:
        """An item's budget: ``weight / weights_left`` of the time left now."""
        seconds = max(0.0, self.left()) * weight / weights_left if weights_left > 0 else 0.0
        return ItemBudget(self.clock() + seconds, seconds, self.clock)


class ItemBudget:
    """One item's deadline; ``fits(seconds)`` says whether a measurement of that length still fits."""

    def __init__(self, deadline: float, seconds: float, clock: Callable[[], float]):
        self.deadline = deadline
        self.seconds = seconds
        self.clock = clock

    def left(self) -> float:
        return self.deadline - self.clock()

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds


class Watchdog:
    """Calls ``on_fire`` then ends the process with exit status 3, ``after_s`` seconds from start()."""

    def __init__(self, after_s: float, on_fire: Callable[[], None]):
        self.after_s = after_s
        self.on_fire = on_fire
        self._timer = threading.Timer(after_s, self._fire)
        self._timer.daemon = True

    def start(self) -> Watchdog:
        self._timer.start()
        return self

    def cancel(self) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        print(f"gpu check: WATCHDOG: still running {self.after_s:.0f} s after the start; writing what was "
              f"measured and exiting with status 3", file=sys.stderr, flush=True)
        try:
            self.on_fire()
        finally:
            os._exit(3)
