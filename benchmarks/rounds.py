"""Alternating rounds: contenders timed side by side, in an order that changes every round.

On a shared, noisy machine a single long run of A then a long run of B
compares two different machines (whatever else ran meanwhile). Instead every
round runs each contender for a few steps, rotating who goes first, and a
comparison is the per-round ratio: both sides of a ratio saw the same few
seconds of the machine. Tables report the median ratio and its spread.

A contender is ``fn(steps) -> seconds`` for ``steps`` consecutive steps;
:func:`timed` makes one from a plain step function.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from benchmarks.stats import summary

Contender = Callable[[int], float]


def timed(step: Callable[[], object]) -> Contender:
    """``step`` run ``k`` times back to back; returns the wall-clock seconds."""

    def run(k: int) -> float:
        start = time.perf_counter()
        for _ in range(k):
            step()
        return time.perf_counter() - start

    return run


@dataclass
class RoundsResult:
    """Seconds per step of each contender, one entry per round, and the orders used."""

    per_step: dict[str, list[float]]
    orders: list[list[str]] = field(default_factory=list)
    steps_per_round: int = 1

    def seconds(self, name: str) -> dict[str, float | int]:
        return summary(self.per_step[name])

    def ratios(self, numerator: str, denominator: str) -> list[float]:
        """Per round: numerator's seconds per step ÷ denominator's (same round)."""
        return [a / b for a, b in zip(self.per_step[numerator], self.per_step[denominator])]

    def ratio(self, numerator: str, denominator: str) -> dict[str, float | int]:
        return summary(self.ratios(numerator, denominator))

    def throughput(self, batch: int, baseline: str) -> dict[str, dict[str, dict[str, float | int]]]:
        """Per contender: seconds per step, samples/s (``batch`` rows a step), speed-up over ``baseline``."""
        return {
            name: {
                "seconds_per_step": self.seconds(name),
                "samples_per_s": summary([batch / s for s in steps]),
                "speedup_vs_baseline": self.ratio(baseline, name),
            }
            for name, steps in self.per_step.items()
        }

    def as_dict(self) -> dict[str, object]:
        return {
            "steps_per_round": self.steps_per_round,
            "orders": self.orders,
            "seconds_per_step": self.per_step,
            "seconds_per_step_summary": {k: summary(v) for k, v in self.per_step.items()},
        }


def alternating_rounds(
    contenders: Mapping[str, Contender],
    rounds: int,
    steps: int = 1,
    warmup: int = 1,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> RoundsResult:
    """Warm every contender up, then ``rounds`` rounds of ``steps`` steps each, rotating the order."""
    names = list(contenders)
    if warmup:
        for name in names:
            contenders[name](warmup)
    result = RoundsResult({name: [] for name in names}, steps_per_round=steps)
    for r in range(rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        if r % 2 and len(names) > 2:
            order.reverse()
        result.orders.append(order)
        this_round: dict[str, float] = {}
        for name in order:
            this_round[name] = contenders[name](steps) / steps
        for name in names:
            result.per_step[name].append(this_round[name])
        if on_round is not None:
            on_round(r, this_round)
    return result
