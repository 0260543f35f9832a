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
the first holder saves the live state before it touches the generator, and
every entry and exit bumps an epoch; a reader takes the saved state while a
holder is in, the generator's own state otherwise, and reads again if the
epoch changed meanwhile.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

#: Reentrant: a compiled stage re-takes it inside a drawing forward (see :mod:`pipesched.runtime.compiling`).
CPU_LOCK = threading.RLock()


class _Guard:
    """One generator's lock, holder count, change epoch and (while held) saved live state."""

    def __init__(self, name: str, lock: threading.RLock, generator: torch.Generator):
        self.name = name
        self.lock = lock
        self.generator = generator
        self.holders = 0
        self.epoch = 0
        self.saved: torch.Tensor | None = None

    def enter(self) -> torch.Tensor:
        """Call holding ``lock``: become a holder; returns the state to put back on :meth:`exit`."""
        state = self.generator.get_state()
        if self.holders == 0:
            self.saved = state  # before the epoch moves: a reader that sees no saved state retries
        self.holders += 1
        self.epoch += 1
        return state

    def exit(self) -> None:
        """Call holding ``lock``, after putting the state back."""
        self.epoch += 1
        self.holders -= 1
        if self.holders == 0:
            self.saved = None

    def live(self) -> bytes:
        """The live state (what it is, or will be again once the holders are out), without the lock."""
        for _ in range(1000):
            epoch = self.epoch
            saved = self.saved
            state = saved if saved is not None else self.generator.get_state()
            if self.epoch == epoch:
                return fingerprint(state)
        with self.lock:  # holders kept coming and going all along: wait for a quiet moment instead
            return fingerprint(self.saved if self.saved is not None else self.generator.get_state())


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


def live_states(device: torch.device) -> list[bytes]:
    """The live states of ``device``'s generators, read without waiting for their locks."""
    return [guard.live() for guard in guards(device)]


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
        self.entry: list[bytes] = []
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
            self.entry = [fingerprint(state) for state in self._restore]
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
