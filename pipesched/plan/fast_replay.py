"""Replay a plan on arrays: the same times as :func:`pipesched.plan.replay.replay`, in linear time with a small constant.

The model is the reference's, unchanged: an action starts when the action
before it on its rank has ended and every input has arrived (its producer's
end, plus ``comm`` when the producer ran on another rank); it ends ``cost``
later. That is a longest path through the plan's dependency graph, and the
reference walks it node by node through dicts (about 25 µs an action).

Here the walk goes in *waves*: every rank looks at the first action it has
not run; those whose inputs have all been run are run together, as numpy
operations over the ranks, and each such rank moves on by one::

    wave:    1     2     3     4   ...
    rank 0:  F0.0  F0.1  F0.2  .     (B0.0 waits for B1.0)
    rank 1:  .     F1.0  F1.1  B1.0  ...

Each action's start is ``max(rank's last end, input arrivals)``, the very
floating-point operations the reference does, so the times are identical,
bit for bit, and so is the input blamed for a start (the rank's previous
action unless an input arrives strictly later; among inputs, the first in
:func:`~pipesched.plan.lowering.inputs_of` order). A wave costs a few numpy
calls, and there are about as many waves as actions on the busiest rank, so
the cost per action shrinks with the number of ranks; below
:data:`WAVE_MIN_RANKS` ranks a plain loop over integers is faster and is used
instead (same rule, same result).

When a wave finds no rank able to move before all actions ran, the plan
deadlocks: the actions not run are exactly those the reference's walk never
reaches, and :class:`~pipesched.plan.replay.Deadlock` names the same waiting
actions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipesched.plan.lowering import Skips, dependencies
from pipesched.plan.plan_arrays import PlanArrays
from pipesched.plan.replay import Deadlock

__all__ = ["ArrayReplay", "WAVE_MIN_RANKS", "replay_arrays"]

#: Fewest ranks for which the numpy waves beat a plain loop (a wave costs ~30 µs, a loop step ~1 µs).
WAVE_MIN_RANKS = 24


@dataclass(frozen=True)
class ArrayReplay:
    """Per action (flat plan order): ``start``, ``end`` and ``because`` (the position that decided its start, -1: none)."""

    start: np.ndarray
    end: np.ndarray
    because: np.ndarray


def replay_arrays(
    arrays: PlanArrays,
    deps: np.ndarray,
    duration: np.ndarray | None,
    comm: float,
    skips: Skips = (),
    engine: str | None = None,
) -> ArrayReplay | None:
    """Replay the flat plan; ``duration=None`` only checks for a deadlock (and returns ``None``).

    ``deps``: :meth:`PlanArrays.dependencies`, every wanted input present.
    ``engine``: ``"waves"`` or ``"loop"`` to force one (tests run both);
    default by the number of ranks. Raises :class:`Deadlock`.
    """
    if engine is None:
        engine = "waves" if arrays.num_ranks >= WAVE_MIN_RANKS else "loop"
    if engine not in ("waves", "loop"):
        raise ValueError(f"engine must be 'waves' or 'loop', got {engine!r}")
    size = arrays.size
    dep = np.where(deps < 0, size, deps)  # size: a sentinel input, always done, arriving at -inf
    hop = None
    if duration is not None and comm != 0.0:  # the delay on each input: comm across ranks, else none
        producer_rank = np.append(arrays.rank, -1)[dep]
        hop = np.where((producer_rank != arrays.rank[:, None]) & (dep < size), comm, 0.0)
    if engine == "waves":
        cursor, end = _waves(arrays, dep, hop, duration)
    else:
        cursor, end = _loop(arrays, dep, hop, duration)
    if (cursor < arrays.offsets + arrays.lengths).any():
        _raise_deadlock(arrays, cursor, skips)
    if duration is None:
        return None
    return _explain(arrays, dep, hop, end)


def _waves(arrays: PlanArrays, dep: np.ndarray, hop: np.ndarray | None,
           duration: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per rank, the first action not run; per action, its end (NaN: not run; sentinel last, at -inf)."""
    size = arrays.size
    end = np.full(size + 1, np.nan)
    end[size] = -np.inf
    timed = duration is not None
    cursor = arrays.offsets + arrays.lengths  # finished ranks end there; the others are written back below
    ranks = np.nonzero(arrays.lengths)[0]
    heads = arrays.offsets[ranks].copy()
    ends = cursor[ranks]
    rank_end = np.zeros(ranks.size)
    while ranks.size:
        inputs = dep[heads]
        arrival = end[inputs]
        if np.isnan(arrival).any():
            ready = ~np.isnan(arrival).any(axis=1)
            if not ready.any():
                break
            moving = heads[ready]
            arrival = arrival[ready]
        else:
            ready, moving = None, heads
        if timed:
            if hop is not None:
                arrival += hop[moving]
            finish = arrival[:, 0] if arrival.shape[1] == 1 else np.maximum.reduce(arrival, axis=1)
            if ready is None:
                np.maximum(finish, rank_end, out=finish)
                finish += duration[moving]  # type: ignore[index]
                rank_end = finish
            else:
                finish = np.maximum(finish, rank_end[ready]) + duration[moving]  # type: ignore[index]
                rank_end[ready] = finish
            end[moving] = finish
        else:
            end[moving] = 0.0
        if ready is None:
            heads = heads + 1
        else:
            heads = heads + ready
        left = heads < ends
        if not left.all():
            ranks, heads, ends, rank_end = ranks[left], heads[left], ends[left], rank_end[left]
    cursor[ranks] = heads
    return cursor, end[:size]


def _loop(arrays: PlanArrays, dep: np.ndarray, hop: np.ndarray | None,
          duration: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The same rule as :func:`_waves`, one action at a time, sweeping the ranks until none can move."""
    size = arrays.size
    inputs = dep.tolist()
    delays = hop.tolist() if hop is not None else [[0.0] * dep.shape[1]] * size  # one shared row: read only
    cost = duration.tolist() if duration is not None else [0.0] * size
    end = [math.nan] * size + [-math.inf]
    cursor = arrays.offsets.tolist()
    stop = (arrays.offsets + arrays.lengths).tolist()
    rank_end = [0.0] * arrays.num_ranks
    moved = True
    while moved:
        moved = False
        for r in range(arrays.num_ranks):
            i, begin_at = cursor[r], rank_end[r]
            while i < stop[r]:
                begin = begin_at
                for j, delay in zip(inputs[i], delays[i]):
                    arrival = end[j] + delay
                    if arrival != arrival:  # NaN: not run yet
                        break
                    if arrival > begin:
                        begin = arrival
                else:
                    end[i] = begin_at = begin + cost[i]
                    i += 1
                    continue
                break
            if i != cursor[r]:
                cursor[r], rank_end[r], moved = i, begin_at, True
    return np.array(cursor, dtype=np.int64), np.array(end[:size])


def _explain(arrays: PlanArrays, dep: np.ndarray, hop: np.ndarray | None, end: np.ndarray) -> ArrayReplay:
    """Start and deciding predecessor of every action, from the ends (the reference's rule, all at once).

    An action started at the latest of its rank's previous end (0 for a
    rank's first action) and its inputs' arrivals. What decided it is the
    rank's previous action unless an input arrives strictly later, else the
    first input, in :func:`~pipesched.plan.lowering.inputs_of` order, to
    arrive last: what the reference's "replace only if strictly later" walk finds.
    """
    size = arrays.size
    first = np.zeros(size, dtype=bool)
    first[arrays.offsets[arrays.lengths > 0]] = True
    previous = np.arange(-1, size - 1)
    previous[first] = -1
    tail = np.where(first, 0.0, np.append(end, 0.0)[previous])
    ended = np.append(end, -np.inf)
    arrivals = [ended[dep[:, column]] for column in range(dep.shape[1])]  # column by column: no (n, k) reductions
    if hop is not None:
        arrivals = [arrival + hop[:, column] for column, arrival in enumerate(arrivals)]
    latest = np.full(size, -np.inf)
    for arrival in arrivals:
        np.maximum(latest, arrival, out=latest)
    start = np.maximum(tail, latest)
    blamed = np.full(size, -1, dtype=np.int64)
    for column in reversed(range(dep.shape[1])):  # the first column to reach the latest wins
        blamed = np.where(arrivals[column] == latest, dep[:, column], blamed)
    because = np.where(tail >= latest, previous, blamed)
    return ArrayReplay(start, end, because.astype(np.int64))


def _raise_deadlock(arrays: PlanArrays, cursor: np.ndarray, skips: Skips) -> None:
    """The reference's :class:`Deadlock`: per stuck rank, its first action not run and the inputs it lacks."""
    position = np.arange(arrays.size) - np.repeat(arrays.offsets, arrays.lengths)
    done = position < np.repeat(cursor - arrays.offsets, arrays.lengths)
    stuck = []
    for r in range(arrays.num_ranks):
        head_at = int(cursor[r])
        if head_at >= int(arrays.offsets[r] + arrays.lengths[r]):
            continue
        head = arrays.actions[head_at]
        blockers = tuple(d for d in dependencies(head, arrays.num_stages, skips)
                         if arrays.position(d) < 0 or not done[arrays.position(d)])
        stuck.append((r, head, blockers))
    raise Deadlock(stuck)
