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
    run = _waves if engine == "waves" else _loop
    cursor, result = run(arrays, deps, duration, comm)
    if (cursor < arrays.offsets + arrays.lengths).any():
        _raise_deadlock(arrays, cursor, result_done(arrays, cursor), skips)
    return result


def result_done(arrays: PlanArrays, cursor: np.ndarray) -> np.ndarray:
    """Whether each action ran, given each rank's first action not run (actions run in plan order per rank)."""
    position = np.arange(arrays.size) - np.repeat(arrays.offsets, arrays.lengths)
    return position < np.repeat(cursor - arrays.offsets, arrays.lengths)


def _waves(arrays: PlanArrays, deps: np.ndarray, duration: np.ndarray | None,
           comm: float) -> tuple[np.ndarray, ArrayReplay | None]:
    size = arrays.size
    dep = np.where(deps < 0, size, deps)  # size: a sentinel input, always done, arriving at -inf
    done = np.zeros(size + 1, dtype=bool)
    done[size] = True
    timed = duration is not None
    if timed:
        producer_rank = np.append(arrays.rank, -1)[dep]
        hop = np.where((producer_rank != arrays.rank[:, None]) & (dep < size), comm, 0.0)
        start = np.zeros(size)
        end = np.full(size + 1, -np.inf)
        because = np.full(size, -1, dtype=np.int64)
        rank_end = np.zeros(arrays.num_ranks)
        rank_last = np.full(arrays.num_ranks, -1, dtype=np.int64)
    cursor = arrays.offsets.copy()
    stop = arrays.offsets + arrays.lengths
    ranks = np.nonzero(arrays.lengths)[0]
    heads, ends = cursor[ranks], stop[ranks]
    while ranks.size:
        inputs = dep[heads]
        ready = done[inputs].all(axis=1)
        if not ready.all():
            if not ready.any():
                break
            moving, moving_ranks, inputs = heads[ready], ranks[ready], inputs[ready]
        else:
            moving, moving_ranks = heads, ranks
        if timed:
            candidates = np.concatenate((rank_end[moving_ranks][:, None], end[inputs] + hop[moving]), axis=1)
            choice = candidates.argmax(axis=1)
            rows = np.arange(moving.size)
            begin = candidates[rows, choice]
            finish = begin + duration[moving]
            start[moving] = begin
            end[moving] = finish
            because[moving] = np.where(choice == 0, rank_last[moving_ranks],
                                       inputs[rows, np.maximum(choice - 1, 0)])
            rank_end[moving_ranks] = finish
            rank_last[moving_ranks] = moving
        done[moving] = True
        heads = heads + ready
        cursor[moving_ranks] += 1
        left = heads < ends
        if not left.all():
            ranks, heads, ends = ranks[left], heads[left], ends[left]
    if not timed:
        return cursor, None
    return cursor, ArrayReplay(start, end[:size], because)


def _loop(arrays: PlanArrays, deps: np.ndarray, duration: np.ndarray | None,
          comm: float) -> tuple[np.ndarray, ArrayReplay | None]:
    """The same rule as :func:`_waves`, one action at a time, sweeping the ranks until none can move."""
    size = arrays.size
    rank = arrays.rank.tolist()
    inputs = [[j for j in row if j >= 0] for row in deps.tolist()]
    cost = duration.tolist() if duration is not None else [0.0] * size
    done = [False] * size
    start, end, because = [0.0] * size, [0.0] * size, [-1] * size
    cursor = arrays.offsets.tolist()
    stop = (arrays.offsets + arrays.lengths).tolist()
    rank_end = [0.0] * arrays.num_ranks
    rank_last = [-1] * arrays.num_ranks
    moved = True
    while moved:
        moved = False
        for r in range(arrays.num_ranks):
            i, last, begin_at = cursor[r], rank_last[r], rank_end[r]
            while i < stop[r]:
                needs = inputs[i]
                if not all(done[j] for j in needs):
                    break
                begin, why = begin_at, last
                for j in needs:
                    arrival = end[j] + (comm if rank[j] != r else 0.0)
                    if arrival > begin:
                        begin, why = arrival, j
                start[i], because[i] = begin, why
                end[i] = begin_at = begin + cost[i]
                done[i] = True
                last = i
                i += 1
            if i != cursor[r]:
                cursor[r], rank_last[r], rank_end[r], moved = i, last, begin_at, True
    result = ArrayReplay(np.array(start), np.array(end), np.array(because, dtype=np.int64)) \
        if duration is not None else None
    return np.array(cursor, dtype=np.int64), result


def _raise_deadlock(arrays: PlanArrays, cursor: np.ndarray, done: np.ndarray, skips: Skips) -> None:
    """The reference's :class:`Deadlock`: per stuck rank, its first action not run and the inputs it lacks."""
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
