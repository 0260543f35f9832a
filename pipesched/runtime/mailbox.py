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

    A plain lock is the cheapest wake-up Python offers (``threading.Event``
    adds a Condition, a waiter lock per wait and Python-level bookkeeping,
    measured at several microseconds of GIL-held time per hand-off). The lock
    is made only when the consumer actually has to wait (its value is not
    there yet): a step has a slot per transfer (448 at p = 8, m = 32), and
    making and closing a lock for each one up front cost 0.28 ms of the
    caller's time at every step start, measured. The mailbox's guard orders
    the consumer's "not filled yet, here is my lock" against the producer's
    "filled" and against an abort, so no wake-up is lost.
    """

    __slots__ = ("_gate", "_value", "_filled", "_mailbox", "filled_at")

    def __init__(self, mailbox: Mailbox):
        self._gate: threading.Lock | None = None  # the waiting consumer's lock, held until put or abort
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
        with self._mailbox._guard:
            self._filled = True
            gate = self._gate
        if gate is not None:
            _release(gate)

    def get(self) -> Any:
        """Wait for the value and take it: the slot drops its reference (one reader per slot)."""
        mailbox = self._mailbox
        if not self._filled:
            gate = threading.Lock()
            gate.acquire()
            with mailbox._guard:
                wait = not self._filled and not mailbox.aborted
                if wait:
                    self._gate = gate
            if wait:
                gate.acquire()  # released by put or abort
        if mailbox.aborted:
            raise StepAborted(mailbox.abort_reason)
        value, self._value = self._value, None
        return value

    def _open(self) -> None:
        """Wake the consumer if it waits (an abort)."""
        with self._mailbox._guard:
            gate = self._gate
        if gate is not None:
            _release(gate)


def _release(gate: threading.Lock) -> None:
    try:
        gate.release()
    except RuntimeError:  # already open (an abort raced with a put)
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
        self._guard = threading.Lock()  # orders a slot's fill, its consumer's wait and an abort
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
        with self._guard:  # a consumer about to wait sees the abort, or has registered its lock by now
            self.aborted = True
        for slot in self._slots.values():
            slot._open()
