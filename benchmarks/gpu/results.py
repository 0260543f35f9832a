"""What the GPU check writes: ``gpu.json`` (everything) and ``gpu.md`` (tables), after every change.

Both files are rewritten (atomically, by rename) each time a row, a skip or a
failure is recorded, so a run cut short by the device's time limit or by the
watchdog still leaves everything it measured. Only these two files are
written: the device returns at most 8 files from ``$OUT``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.results import json_safe

JSON_NAME = "gpu.json"
MARKDOWN_NAME = "gpu.md"


@dataclass
class ItemResult:
    """One item of the check: its rows, what was skipped, wrong gradients, errors, notes."""

    name: str
    title: str
    columns: list[tuple[str, str]]  # (row key, column header)
    status: str = "pending"  # pending | running | done | error | not run
    seconds: float = 0.0
    budget_s: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Results:
    """The run's record; every mutation goes through here and is saved at once."""

    def __init__(self, out_dir: Path, meta: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.items: dict[str, ItemResult] = {}
        self._lock = threading.RLock()

    # -- recording --------------------------------------------------------
    def add_item(self, name: str, title: str, columns: list[tuple[str, str]]) -> ItemResult:
        with self._lock:
            self.items[name] = ItemResult(name, title, columns)
            self.save()
            return self.items[name]

    def row(self, item: ItemResult, **values: Any) -> dict[str, Any]:
        with self._lock:
            item.rows.append(values)
            self.save()
            return values

    def skip(self, item: ItemResult, what: str, why: str) -> None:
        with self._lock:
            item.skipped.append(f"{what}: {why}")
            self.save()

    def fail(self, item: ItemResult, message: str) -> None:
        """A wrong result (gradient mismatch, model mismatch): the run exits non-zero."""
        with self._lock:
            item.failures.append(message)
            self.save()

    def error(self, item: ItemResult, message: str) -> None:
        with self._lock:
            item.errors.append(message)
            self.save()

    def note(self, item: ItemResult, message: str) -> None:
        with self._lock:
            item.notes.append(message)
            self.save()

    def set(self, item: ItemResult, **fields: Any) -> None:
        with self._lock:
            for key, value in fields.items():
                setattr(item, key, value)
            self.save()

    # -- summaries --------------------------------------------------------
    def failures(self) -> list[str]:
        return [f"{i.name}: {f}" for i in self.items.values() for f in i.failures]

    def errors(self) -> list[str]:
        return [f"{i.name}: {e}" for i in self.items.values() for e in i.errors]

    # -- writing ----------------------------------------------------------
    def save(self) -> None:
        with self._lock:
            document = {"meta": self.meta, "failures": self.failures(), "errors": self.errors(),
                        "items": {name: _item_dict(item) for name, item in self.items.items()}}
            _write(self.out_dir / JSON_NAME, json.dumps(json_safe(document), indent=1) + "\n")
            _write(self.out_dir / MARKDOWN_NAME, self.markdown())

    def markdown(self) -> str:
        with self._lock:
            meta = self.meta
            lines = [f"# GPU check ({'CPU dry run' if meta.get('dry_run') else meta.get('device_name', '?')})", ""]
            lines.append(" · ".join(f"{k}: {meta[k]}" for k in ("date", "device_name", "torch", "cuda", "python",
                                                              "budget_s", "elapsed_s") if k in meta))
            lines.append("")
            failures, errors = self.failures(), self.errors()
            lines.append(f"**{'FAILED' if failures else 'no wrong gradients'}**"
                         f"{f' ({len(failures)} wrong)' if failures else ''}; errors: {len(errors)}")
            lines.append("")
            for item in self.items.values():
                lines += _item_markdown(item)
            return "\n".join(lines) + "\n"


def _item_dict(item: ItemResult) -> dict[str, Any]:
    return {"title": item.title, "status": item.status, "seconds": item.seconds, "budget_s": item.budget_s,
            "columns": [key for key, _ in item.columns], "rows": item.rows, "skipped": item.skipped,
            "failures": item.failures, "errors": item.errors, "notes": item.notes, **item.extra}


def _item_markdown(item: ItemResult) -> list[str]:
    status = (f"status: {item.status}, {item.seconds:.1f} s of a {item.budget_s:.0f} s share; "
              f"{len(item.rows)} rows, {len(item.skipped)} skipped, {len(item.failures)} wrong, "
              f"{len(item.errors)} errors")
    lines = [f"## {item.title}", "", status, ""]
    if item.rows:
        lines.append("| " + " | ".join(_cell(header) for _, header in item.columns) + " |")
        lines.append("|" + "---|" * len(item.columns))
        for row in item.rows:
            lines.append("| " + " | ".join(_cell(row.get(key, "")) for key, _ in item.columns) + " |")
        lines.append("")
    for label, entries in (("wrong", item.failures), ("error", item.errors), ("skipped", item.skipped),
                           ("note", item.notes)):
        lines += [f"- {label}: {entry}" for entry in entries]
    if item.failures or item.errors or item.skipped or item.notes:
        lines.append("")
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1e4 else str(value)
    return str(value).replace("|", "/")


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
