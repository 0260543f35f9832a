"""Where one rank leaves a value for another: one write-once slot per transfer.

A worker that needs an input blocks on that input's slot, so data passes rank
to rank without waking the event loop. Aborting a step sets every slot at once:
each waiting worker wakes, sees the abort and stops at its next action
boundary, so a failure anywhere can never leave a rank blocked forever.
"""

from __future__ import annotations

import threading
from typing import Any


class StepAborted(Exception):
    """Raised in a worker whose step was aborted because another task failed."""


class Slot:
    __slots__ = ("_ready", "_value", "_mailbox")

    def __init__(self, mailbox: Mailbox):
        self._ready = threading.Event()
        self._value: Any = None
        self._mailbox = mailbox

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._mailbox.aborted

    def put(self, value: Any) -> None:
        self._value = value
        self._ready.set()

    def get(self) -> Any:
        self._ready.wait()
        if self._mailbox.aborted:
            raise StepAborted(self._mailbox.abort_reason)
        return self._value


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
            slot._ready.set()
