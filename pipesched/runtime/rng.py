"""Random numbers that do not depend on thread timing: one stream per (stage, micro-batch) forward.

All CPU ranks of a process share torch's one CPU generator, and ranks that
share a CUDA device share its generator. Drawing from them in whatever order
the worker threads get there makes dropout masks depend on timing: two runs
with the same ``torch.manual_seed`` differ, schedules are not comparable, and
a checkpointed forward's recompute could see other draws than its first run.

The rule here:

* At the start of a step, one 62-bit *step seed* is drawn from the caller's
  CPU generator (one draw, so consecutive steps differ and a seeded run
  repeats), holding its lock (:func:`pipesched.runtime.generators.draw_live`).
  Nothing is drawn when no stage can draw.
* Every forward of (stage, micro-batch) that draws runs with the process's
  generators (CPU, and its CUDA device's) re-seeded to
  :func:`forward_seed` ``(step seed, stage, micro-batch)``, holding their
  locks, and puts the live generator states back afterwards
  (:mod:`pipesched.runtime.generators`). Its masks are therefore a function of
  (step seed, stage, micro-batch) only: identical on every rerun, under every
  schedule with the same balance, and in the recompute of a checkpointed
  forward, which simply runs seeded again.

Which forwards draw is found where it cannot be missed
(:mod:`pipesched.runtime.draw_detection`): stages of exact quiet classes run
as is; any other forward runs under a dispatch-level watcher that seeds at
the first kernel torch tags as drawing, after which the stage is known to
draw and is seeded up front (no watcher cost). A stage that starts drawing
late (input-dependent dropout, a module switched to training later) is caught
the same way. The recompute of a forward whose first run was watched and drew
nothing is not watched again: it must draw nothing either, which the
generators' live states show (as below) at a fraction of the watcher's cost.

Two checks turn the draws this cannot see into errors instead of wrong
gradients:

* *Backstop*: a watched forward of a stage in training mode must leave the
  generators' live states as it found them until its first seeded draw. If
  one moved, a kernel drew without torch's tag (a custom op) or another thread
  drew during ``step()``. (In eval mode nothing is recomputed, and a thread
  drawing while ``pipe(x)`` runs inference is left alone.)
* *Replay check*: the state a seeded checkpointed forward leaves the
  generators in is kept, and its recompute must leave the same. Another
  thread drawing from the process-wide generator while a seeded forward runs
  takes numbers from its stream, so the two runs end elsewhere (unless that
  thread happened to draw exactly as much during both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from pipesched.runtime.draw_detection import Watcher, draws_nothing
from pipesched.runtime.draw_detection import declare_quiet as declare_quiet  # re-exported
from pipesched.runtime.generators import CPU_LOCK as _CPU_LOCK  # noqa: F401  (tests check it is free)
from pipesched.runtime.generators import Held, Live, draw_live, guards, live_states
from pipesched.runtime.generators import holding_generators as holding_generators  # re-exported

T = TypeVar("T")
#: How a forward is run: once; the first run of a checkpointed forward; its recompute.
Phase = Literal["once", "checkpointed", "recompute"]
_MASK64 = (1 << 64) - 1


def _mix(value: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints that scatters nearby inputs."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def forward_seed(step_seed: int, stage: int, microbatch: int) -> int:
    """The generator seed of (stage, micro-batch)'s forward in the step seeded ``step_seed``."""
    return _mix(_mix(_mix(step_seed) ^ stage) ^ (microbatch << 20)) >> 1  # < 2**63: manual_seed's range


def draw_step_seed() -> int:
    """One draw from the caller's CPU generator: the seed of a step's random streams."""
    return draw_live(lambda: int(torch.randint(0, 1 << 62, (), dtype=torch.int64).item()))


def generators_held(device: torch.device) -> Held:
    """Hold the generators a forward on ``device`` draws from, without re-seeding them (reentrant).

    For code that moves the process-wide generators without drawing: Dynamo
    saves and restores them around every compilation, which would rewind the
    draws of a forward running on another rank meanwhile (see
    :mod:`pipesched.runtime.compiling`).
    """
    return Held(device)


def _escaped(stage: int, microbatch: int, moved: list[str], recompute: bool = False) -> RuntimeError:
    also = (" Or this recompute drew although the forward's first run drew nothing (a forward that draws "
            "depending on pipesched.is_recomputing() or on grad mode)." if recompute else "")
    return RuntimeError(
        f"stage {stage}, micro-batch {microbatch}: torch's {' and '.join(moved)} random generator moved during "
        f"a forward that pipesched had not seeded, so a random draw escaped the per-(stage, micro-batch) streams "
        f"and a checkpointed recompute would not replay it (its gradient would belong to another forward). "
        f"Either a kernel drew without torch's nondeterministic_seeded tag (a custom op: register it with "
        f"tags=(torch.Tag.nondeterministic_seeded,)), or another thread drew from torch's global generator during "
        f"step() (give that thread its own torch.Generator, e.g. torch.rand(..., generator=g), or draw before "
        f"step()).{also}"
    )


def _not_replayed(stage: int, microbatch: int, moved: list[str]) -> RuntimeError:
    return RuntimeError(
        f"stage {stage}, micro-batch {microbatch}: the recompute of this checkpointed forward drew other random "
        f"numbers than its first run (torch's {' and '.join(moved)} generator ended elsewhere), so its gradient "
        f"would belong to another forward than its loss. Most likely another thread drew from torch's global "
        f"generator during step(): pipesched re-seeds that process-wide generator for each forward that draws, "
        f"so such a thread takes numbers from the forward's stream. Give that thread its own torch.Generator "
        f"(e.g. torch.rand(..., generator=g)) or draw before step(). Else the forward draws differently when "
        f"run again (depending on pipesched.is_recomputing() or on grad mode). checkpoint='never' avoids "
        f"recomputes."
    )


def _moved(device: torch.device, before: list[Live], after: list[Live]) -> list[str]:
    """The generators whose state changed, unless it moved legitimately (a step seed drawn meanwhile)."""
    return [guard.name for guard, (b_moves, b), (a_moves, a) in zip(guards(device), before, after)
            if b_moves == a_moves and b != a]


class RandomStreams:
    """Which stages of a pipeline draw (per training mode), learned over its lifetime."""

    def __init__(self) -> None:
        self._drawing: set[tuple[int, bool]] = set()

    def known_to_draw(self, stage: int, training: bool) -> bool:
        return (stage, training) in self._drawing

    def learn(self, stage: int, training: bool) -> None:
        self._drawing.add((stage, training))  # one atomic set operation under the GIL

    def step(
        self, stages: Sequence[nn.Module | None], devices: Sequence[torch.device], training: Sequence[bool]
    ) -> StepRandom:
        """The random streams of one step; draws its seed from the caller's generator if needed.

        ``devices[s]`` and ``training[s]``: where stage ``s`` runs and whether it is in training mode.
        """
        quiet = [draws_nothing(stage) for stage in stages]
        seed = None if all(quiet) else draw_step_seed()
        return StepRandom(self, seed, quiet, list(devices), list(training))


class StepRandom:
    """Runs the forwards of one step on their own random streams (first runs and recomputes alike)."""

    def __init__(self, streams: RandomStreams, seed: int | None, quiet: list[bool],
                 devices: list[torch.device], training: list[bool]):
        self.streams = streams
        self.seed = seed
        self.quiet = quiet
        self.devices = devices
        self.training = training
        self._ends: dict[tuple[int, int], list[bytes]] = {}  # where checkpointed first runs left the generators
        self._silent: set[tuple[int, int]] = set()  # checkpointed first runs that ran watched and drew nothing

    def run(self, stage: int, microbatch: int, fn: Callable[..., T], *args: Any, phase: Phase = "once") -> T:
        """Run ``fn(*args)`` (a forward of ``stage`` on ``microbatch``) on that pair's random stream.

        ``phase``: whether this is the only run, the first run of a
        checkpointed forward, or its recompute (which must draw the same).
        """
        if self.seed is None or self.quiet[stage]:
            return fn(*args)
        device, training = self.devices[stage], self.training[stage]
        seeding = Held(device, forward_seed(self.seed, stage, microbatch), keep_end=phase != "once")
        if self.streams.known_to_draw(stage, training):
            with seeding:
                result = fn(*args)
        elif phase == "recompute" and (stage, microbatch) in self._silent:
            # its first run, watched, drew nothing: the same forward again must not either, and the
            # generators' live states tell whether it did (the watcher would only cost time here)
            before = live_states(device)
            result = fn(*args)
            moved = _moved(device, before, live_states(device))
            if moved:
                raise _escaped(stage, microbatch, moved, recompute=True)
            return result
        else:
            before = live_states(device) if training else None  # eval: see the module docstring
            watcher = Watcher(seeding)
            try:
                with watcher:
                    result = fn(*args)
            finally:
                watcher.release()
                if watcher.fired:
                    self.streams.learn(stage, training)
            if before is not None:
                after = seeding.entry if watcher.fired else live_states(device)
                moved = _moved(device, before, after)
                if moved:
                    raise _escaped(stage, microbatch, moved)
            if not watcher.fired:
                if phase == "checkpointed":
                    self._silent.add((stage, microbatch))
                return result
        self._check_replay(stage, microbatch, device, phase, seeding.end)
        return result

    def _check_replay(self, stage: int, microbatch: int, device: torch.device, phase: Phase,
                      end: list[bytes] | None) -> None:
        if phase == "checkpointed" and end is not None:
            self._ends[(stage, microbatch)] = end
        elif phase == "recompute" and end is not None:
            first = self._ends.pop((stage, microbatch), None)
            if first is not None and first != end:
                moved = [guard.name for guard, a, b in zip(guards(device), first, end) if a != b]
                raise _not_replayed(stage, microbatch, moved)
