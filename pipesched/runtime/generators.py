"""torch's process-wide random generators: who may move them, and reading their live state.

torch has one CPU generator per process and one per CUDA device, shared by
every thread. :mod:`pipesched.runtime.rng` re-seeds them for each forward that
draws and puts the *live* state (the one the rest of the process sees) back
afterwards. Code that moves them without drawing (Dynamo saves and restores
them around a compilation) holds the same locks: a *holder*.

The checks of :mod:`pipesched.runtime.rng` must read a generator's live state
without waiting for the lock, because a stage that draws nothing must never
wait for one that draws. While a holder is in, the generator itself shows a
seeded state, not the live one. So each generator carries a small seqlock:
the first holder saves the live state before it touches the generator; a
reader takes the saved state while a holder is in, the generator's own state
otherwise, and reads again if a holder came or went meanwhile. Drawing a step's seed moves the live state on
purpose: it does so as a holder and counts the move, so a check that sees the
count change knows the state moved legitimately.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
#: A generator's live state as a reader sees it: (legitimate moves so far, state bytes).
Live = tuple[int, bytes]

#: Reentrant: a compiled stage re-takes it inside a drawing forward (see :mod:`pipesched.runtime.compiling`).
CPU_LOCK = threading.RLock()


class _Guard:
    """One generator's lock, and what readers need: holders, saved live state, legitimate moves.

    ``version`` is a seqlock counter: odd while a holder updates the fields
    below, so a reader that saw it odd, or saw it change, reads again.
    """

    def __init__(self, name: str, lock: threading.RLock, generator: torch.Generator):
        self.name = name
        self.lock = lock
        self.generator = generator
        self.version = 0
        self.holders = 0
        self.moves = 0
        self.saved: torch.Tensor | None = None  # the live state while holders > 0

    def enter(self) -> torch.Tensor:
        """Call holding ``lock``, before touching the generator: returns the state to put back."""
        state = self.generator.get_state()
        self.version += 1
        if self.holders == 0:
            self.saved = state
        self.holders += 1
        self.version += 1
        return state

    def moved(self) -> None:
        """Call as a holder after drawing from the live state on purpose: it is the new live state."""
        self.version += 1
        self.moves += 1
        self.saved = self.generator.get_state()
        self.version += 1

    def exit(self) -> None:
        """Call holding ``lock``, after putting the state back."""
        self.version += 1
        self.holders -= 1
        if self.holders == 0:
            self.saved = None
        self.version += 1

    def live(self) -> Live:
        """The live state (what it is, or will be again once the holders are out), without the lock."""
        for _ in range(1000):
            version = self.version
            if version % 2:
                continue
            moves, saved = self.moves, self.saved
            state = saved if saved is not None else self.generator.get_state()
            if self.version == version:
                return moves, fingerprint(state)
        with self.lock:  # holders kept coming and going all along: wait for a quiet moment instead
            return self.moves, fingerprint(self.saved if self.saved is not None else self.generator.get_state())


def fingerprint(state: torch.Tensor) -> bytes:
    """A generator state as bytes (compared without dispatching a torch op)."""
    return state.numpy().tobytes()


_CPU = _Guard("CPU", CPU_LOCK, torch.default_generator)
_CUDA: dict[int, _Guard] = {}
_CUDA_GUARD = threading.Lock()


def guards(device: torch.device) -> list[_Guard]:
    """The generators a forward on ``device`` may draw from: CPU first (one global lock order)."""
    if device.type != "cuda":
        return [_CPU]
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _CUDA_GUARD:
        guard = _CUDA.get(index)
        if guard is None:
            torch.cuda.init()
            guard = _CUDA[index] = _Guard(f"cuda:{index}", threading.RLock(), torch.cuda.default_generators[index])
    return [_CPU, guard]


def live_states(device: torch.device) -> list[Live]:
    """The live states of ``device``'s generators, read without waiting for their locks."""
    return [guard.live() for guard in guards(device)]


def draw_live(draw: Callable[[], T]) -> T:
    """``draw()`` from the CPU generator's live state, as a counted, legitimate move.

    Holding the lock, so it never takes numbers from a seeded forward's stream
    (another pipeline's, stepping in another thread).
    """
    with _CPU.lock:
        _CPU.enter()
        try:
            return draw()
        finally:
            _CPU.moved()
            _CPU.exit()


class Held:
    """Holds the generators of ``device`` (their locks, as a holder); optionally re-seeds them.

    On exit a seeding holder puts the states found on entry back, then the
    locks are released, in reverse order. With ``seed`` given, :attr:`entry` is the
    live state found (before re-seeding) and, if ``keep_end``, :attr:`end` the
    state the forward left (before putting the live one back).
    """

    def __init__(self, device: torch.device, seed: int | None = None, keep_end: bool = False):
        self.guards = guards(device)
        self.seed = seed
        self.keep_end = keep_end
        self.entry: list[Live] = []
        self.end: list[bytes] | None = None
        self._restore: list[torch.Tensor] = []

    def __enter__(self) -> Held:
        taken: list[_Guard] = []
        try:
            for guard in self.guards:
                guard.lock.acquire()
                taken.append(guard)
                self._restore.append(guard.enter())
        except BaseException:
            self._leave(taken)
            raise
        if self.seed is not None:
            self.entry = [(guard.moves, fingerprint(state)) for guard, state in zip(self.guards, self._restore)]
            for guard in self.guards:
                guard.generator.manual_seed(self.seed)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.keep_end:
            self.end = [fingerprint(guard.generator.get_state()) for guard in self.guards]
        self._leave(self.guards)

    def _leave(self, taken: list[_Guard]) -> None:
        for guard, state in reversed(list(zip(taken, self._restore))):
            if self.seed is not None:  # a plain holder leaves the state as it is (Dynamo restores its own)
                guard.generator.set_state(state)
            guard.exit()
        for guard in reversed(taken):
            guard.lock.release()
        self._restore = []


@contextlib.contextmanager
def holding_generators(device: torch.device) -> Iterator[None]:
    """Hold the generators of ``device`` without re-seeding them (reentrant).

    For code that moves the process-wide generators without drawing: Dynamo
    saves and restores them around every compilation, which would rewind the
    draws of a forward running on another rank meanwhile (see
    :mod:`pipesched.runtime.compiling`). Tests use it to check that nothing
    waits for a lock it must not wait for.
    """
    with Held(device):
        yield
