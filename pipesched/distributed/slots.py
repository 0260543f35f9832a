"""The mailbox slots of transfers whose other end is in another process.

The task bodies read and write every input and output through the step's
:class:`~pipesched.runtime.mailbox.Mailbox`, one slot per transfer of the
lowering, whether the two ends are threads of one process or two processes.
For a transfer that crosses processes, the communicator puts one of these
slots in its place when the step begins: a :class:`SendSlot`'s ``put`` sends
the message, a :class:`RecvSlot`'s ``get`` takes the received one. The task
bodies, the watchdog and the mailbox stay the single-process ones, unaware of
the wire. The slots hold only what to call (a bound send or take), so they
know nothing of the communicator that made them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from pipesched.distributed.inbound import Inbound
from pipesched.runtime.mailbox import Mailbox, Slot
from pipesched.runtime.structure import Structure
from pipesched.runtime.transport import Packet

#: Sends one message: (values, structure) -> None.
Send = Callable[[tuple[Tensor | None, ...], Structure], None]
#: Waits for one message and takes it: () -> (values, structure).
Take = Callable[[], tuple[tuple[Tensor | None, ...], Structure]]


class SendSlot(Slot):
    """A mailbox slot whose consumer lives in another process: ``put`` sends it."""

    def __init__(self, mailbox: Mailbox, send: Send):
        super().__init__(mailbox)
        self._send = send

    def put(self, value: Any) -> None:
        packet, structure = value
        self._send(packet.values, structure)


class RecvSlot(Slot):
    """A mailbox slot filled by another process: ``get`` waits on its posted receive."""

    def __init__(self, mailbox: Mailbox, take: Take, inbound: Inbound):
        super().__init__(mailbox)
        self._take = take
        self._inbound = inbound

    @property
    def ready(self) -> bool:
        return self._inbound.arrived_now() and not self._mailbox.aborted

    def put(self, value: Any) -> None:  # pragma: no cover - nothing in this process produces it
        raise RuntimeError("a received message is filled by its peer, not put")

    def get(self) -> Any:
        values, structure = self._take()
        self.filled_at = self._inbound.arrived
        return Packet(values, None), structure
