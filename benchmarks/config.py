"""How big a run is: one of three levels, and where results go.

* ``full``: the sizes the issue asks for; the whole suite fits in 10 minutes
  on a 2-core machine.
* ``quick`` (``--quick``): the same benchmarks at smaller sizes and fewer
  rounds, about a minute in all.
* ``tiny``: the smoke test's sizes (seconds; figures are meaningless).

A benchmark asks ``cfg.pick(tiny=..., quick=..., full=...)`` for each size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LEVELS = ("tiny", "quick", "full")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass
class RunConfig:
    level: str = "full"
    out_dir: Path = field(default_factory=lambda: DEFAULT_OUT)
    rounds: int | None = None  # overrides every benchmark's own round count
    verbose: bool = True
    #: ``--profile DIR``: run each benchmark under torch.profiler, trace to DIR/<name>.trace.json.
    profile_dir: Path | None = None
    #: GIL switch intervals (seconds) that benchmark 1 compares side by side with the default (--switch-interval)
    switch_intervals: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        self.out_dir = Path(self.out_dir)
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if any(not s > 0 for s in self.switch_intervals):
            raise ValueError(f"switch intervals must be > 0 seconds, got {self.switch_intervals}")

    def pick(self, *, tiny: T, quick: T, full: T) -> T:
        return {"tiny": tiny, "quick": quick, "full": full}[self.level]

    def n_rounds(self, *, tiny: int = 1, quick: int, full: int) -> int:
        """Rounds for a comparison: the override if given, else per level."""
        if self.rounds is not None:
            return self.rounds
        return self.pick(tiny=tiny, quick=quick, full=full)

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"  · {message}", flush=True)
