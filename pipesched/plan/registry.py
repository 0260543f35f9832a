"""Schedule names → schedule objects, with third-party plug-ins found by entry point.

The built-ins (``gpipe``, ``1f1b``, ``interleaved-1f1b`` and its alias
``interleaved``, ``looped-bfs``, and the zero-bubble family ``zb-h1``, ``zb-v``,
``interleaved-zb``, ``dualpipe-v``) are declared in pyproject.toml under the entry-point group
``pipesched.schedules``, exactly as a third-party package declares its own, so
the engine never imports a concrete schedule. :func:`register_schedule` adds
one at run time (tests, notebooks).

Entry points are listed on first use and loaded only when their name is asked
for, so one broken plug-in cannot break the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from pipesched.plan.schedule import Schedule

ENTRY_POINT_GROUP = "pipesched.schedules"

ScheduleFactory = Callable[..., Schedule]

_lock = threading.Lock()
_factories: dict[str, ScheduleFactory] = {}
_entry_points: dict[str, Any] | None = None


def _discovered() -> dict[str, Any]:
    global _entry_points
    if _entry_points is None:
        _entry_points = {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _entry_points


def register_schedule(name: str, factory: ScheduleFactory, *, replace: bool = False) -> None:
    """Make ``get_schedule(name, **options)`` call ``factory(**options)``.

    ``factory`` is usually the Schedule subclass itself. Registering a name that
    already exists raises ``ValueError`` unless ``replace=True``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"schedule name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for schedule {name!r} must be callable, got {factory!r}")
    key = name.strip().lower()
    with _lock:
        exists = key in _factories or key in _discovered()
        if exists and not replace and _factories.get(key) is not factory:
            raise ValueError(
                f"a schedule named {name!r} is already registered; pass replace=True to override it"
            )
        _factories[key] = factory


def list_schedules() -> list[str]:
    """Every name :func:`get_schedule` accepts, sorted."""
    with _lock:
        return sorted(set(_factories) | set(_discovered()))


def get_schedule(name: str, **options: Any) -> Schedule:
    """Build the schedule registered as ``name`` (case-insensitive) with ``options``."""
    if not isinstance(name, str):
        raise TypeError(f"schedule name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    with _lock:
        factory = _factories.get(key)
        if factory is None and key in _discovered():
            factory = _factories[key] = _discovered()[key].load()
    if factory is None:
        raise ValueError(
            f"unknown schedule {name!r}; available: {', '.join(list_schedules())} "
            f"(register your own with pipesched.register_schedule)"
        )
    schedule = factory(**options)
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"schedule factory for {name!r} returned {type(schedule).__name__}, "
            f"expected a pipesched.Schedule"
        )
    return schedule


def schedules_for(num_ranks: int) -> list[tuple[str, int]]:
    """Every registered schedule whose plan builds on ``num_ranks`` ranks, with its default stage count.

    Aliases (``interleaved`` for ``interleaved-1f1b``) are listed once, by
    their canonical name, in registry order.
    """
    fits = []
    for name in list_schedules():
        try:
            schedule = get_schedule(name)
            if schedule.name != name:
                continue
            stages = schedule.default_num_stages(num_ranks)
            schedule.plan(stages, max(2 * num_ranks, 2), num_ranks)
        except (ValueError, TypeError):
            continue
        fits.append((name, stages))
    return fits
