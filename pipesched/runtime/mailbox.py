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

from pipesched.plan.action import Action
from pipesched.plan.lowering import Edge, Lowering, Transfer


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
    """The slots of one step: one per transfer of the plan's lowering.

    A slot carries ``(packet, structure)``: the values, already on their way
    to the consumer's device, and how to rebuild them (a gradient is a plain
    tuple). Which slot an action reads and fills comes from the
    :class:`~pipesched.plan.lowering.Lowering`, the one place that knows what
    flows where.
    """

    def __init__(self, lowering: Lowering):
        self.lowering = lowering
        self.aborted = False
        self.abort_reason: BaseException | None = None
        self._slots: dict[Edge, Slot] = {t.edge: Slot(self) for t in lowering.transfers}

    def slot(self, transfer: Transfer) -> Slot:
        return self._slots[transfer.edge]

    def replace(self, transfer: Transfer, slot: Slot) -> None:
        """Use ``slot`` for ``transfer`` (a multi-process pipeline sends instead of storing)."""
        self._slots[transfer.edge] = slot

    def incoming(self, action: Action) -> list[tuple[Transfer, Slot]]:
        """The transfers ``action`` consumes, with their slots."""
        return [(t, self._slots[t.edge]) for t in self.lowering.receives(action)]

    def outgoing(self, action: Action) -> list[tuple[Transfer, Slot]]:
        """The transfers ``action`` produces, with their slots."""
        return [(t, self._slots[t.edge]) for t in self.lowering.sends(action)]

    def delivered(self, transfer: Transfer) -> bool:
        """Whether ``transfer``'s value reached its slot (it may already have been taken)."""
        return self._slots[transfer.edge].ready

    def abort(self, reason: BaseException | None = None) -> None:
        """Wake every waiting worker; each will raise :class:`StepAborted`.

        ``reason`` is the error to report when nothing in this process failed
        (a remote rank did); the first reason given is kept.
        """
        if reason is not None and self.abort_reason is None:
            self.abort_reason = reason
        self.aborted = True
        for slot in self._slots.values():
            slot._open()
