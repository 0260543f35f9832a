"""Where one rank leaves a value for another: one write-once, read-once slot per transfer.

A worker that needs an input blocks on that input's slot, so data passes rank
to rank without waking the event loop. Every transfer has exactly one reader,
so a slot hands its value over and forgets it: once the consumer is done with
an activation or a gradient, nothing else keeps it alive until the step ends
(a schedule's memory bound holds in real bytes, not only in the meter). Aborting a step sets every slot at once:
each waiting worker wakes, sees the abort and stops at its next action
boundary, so a failure anywhere can never leave a rank blocked forever.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class StepAborted(Exception):
    """Raised in a worker whose step was aborted because another task failed."""


class Slot:
    """A write-once value another thread waits for.

    A plain lock held from creation until ``put`` is the cheapest wake-up
    Python offers (``threading.Event`` adds a Condition, a waiter lock per
    wait and Python-level bookkeeping, measured at several microseconds of
    GIL-held time per hand-off). Releases may race with an abort, so every
    release tolerates a lock that is already open.
    """

    __slots__ = ("_gate", "_value", "_filled", "_mailbox", "filled_at")

    def __init__(self, mailbox: Mailbox):
        self._gate = threading.Lock()
        self._gate.acquire()
        self._value: Any = None
        self._filled = False
        self._mailbox = mailbox
        self.filled_at = 0.0  # time.perf_counter() of the put: when the consumer could start

    @property
    def ready(self) -> bool:
        """The value was delivered (it may already have been taken)."""
        return self._filled and not self._mailbox.aborted

    def put(self, value: Any) -> None:
        self._value = value
        self.filled_at = time.perf_counter()
        self._filled = True
        self._open()

    def get(self) -> Any:
        """Wait for the value and take it: the slot drops its reference (one reader per slot)."""
        if not self._filled:
            self._gate.acquire()
            self._open()  # leave it open: an abort may race with us
        if self._mailbox.aborted:
            raise StepAborted(self._mailbox.abort_reason)
        value, self._value = self._value, None
        return value

    def _open(self) -> None:
        try:
            self._gate.release()
        except RuntimeError:  # already open (an abort raced with us)
            pass


class Mailbox:
    """The slots of one step: activations ``(stage, mb)`` → stage+1, gradients → stage-1."""

    def __init__(self, num_stages: int, num_microbatches: int):
        self.aborted = False
        self.abort_reason: BaseException | None = None
        self.activations = {
            (s, m): Slot(self) for s in range(num_stages - 1) for m in range(num_microbatches)
        }
        self.gradients = {
            (s, m): Slot(self) for s in range(1, num_stages) for m in range(num_microbatches)
        }

    def abort(self, reason: BaseException | None = None) -> None:
        """Wake every waiting worker; each will raise :class:`StepAborted`.

        ``reason`` is the error to report when nothing in this process failed
        (a remote rank did); the first reason given is kept.
        """
        if reason is not None and self.abort_reason is None:
            self.abort_reason = reason
        self.aborted = True
        for slot in (*self.activations.values(), *self.gradients.values()):
            slot._open()
