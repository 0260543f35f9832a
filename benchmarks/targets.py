"""Targets from the issue and their PASS/MISS verdicts, printed under each table."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Target:
    name: str  # what is measured, e.g. "1F1B replay/measured at 10 ms tasks (p=4, m=8)"
    figure: float  # the measured figure (median over rounds/steps)
    threshold: float
    higher_is_better: bool = True
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.higher_is_better:
            return self.figure >= self.threshold
        return self.figure <= self.threshold

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "MISS"

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        note = f"  ({self.note})" if self.note else ""
        return f"  {self.verdict}  {self.name}: {self.figure:.3f} (target {op} {self.threshold:g}){note}"

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "verdict": self.verdict}


def format_targets(targets: list[Target]) -> str:
    if not targets:
        return ""
    return "targets:\n" + "\n".join(t.line() for t in targets)
