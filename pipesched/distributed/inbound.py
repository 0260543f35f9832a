"""One message this rank receives in a step, and the specs both ends keep between steps.

A message's receive is posted ahead of time into a buffer sized from the
spec this rank kept for the message's *key* (the lowering edge it travels
and the shape of its micro-batch). When the key is new, the receive posted
is for a spec instead, and the payload's is posted the moment the spec
arrives. Both ends decide "new" from their caches as they stood when the
step began (:class:`SpecCache`), and each message of the step is judged
against that state, so the two ends always agree on what comes next,
whatever the order in which the messages of one key arrive or fail.

::

    expected spec ──► payload ──OK──► values
         │              ├─ERROR──► error text
         │              └─RESPEC─► spec ──► payload (a shape the key did not predict)
    no spec ────────► spec / error header ──► payload / error text
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from pipesched.distributed.wire import (
    DESCRIPTION,
    ERROR,
    ERROR_TEXT,
    HEADER,
    HEADER_SLOTS,
    OK,
    PAYLOAD,
    RESPEC,
    RESPEC_PAYLOAD,
    Header,
    Spec,
    decode,
    payload_bytes,
    status_of,
    unpack,
)
from pipesched.plan.lowering import Transfer
from pipesched.runtime.structure import Structure

#: What a kind of message is known by: (producer kind, producer stage, consumer kind,
#: consumer stage, what it carries, the micro-batch's shape as the step announced it).
Key = tuple[Any, ...]


def message_keys(transfers: Sequence[Transfer], shapes: Sequence[Any]) -> list[Key]:
    """The key of each transfer: its lowering edge, and the shape of its micro-batch (``shapes[m]``)."""
    return [
        (t.producer.kind, t.producer.stage, t.consumer.kind, t.consumer.stage, t.carries,
         shapes[t.producer.microbatch])
        for t in transfers
    ]


def shape_checksum(tensors: tuple[Tensor, ...]) -> int:
    """A checksum of the inputs' dtypes and shapes past the batch dimension (keys the message specs)."""
    text = repr([(str(t.dtype), tuple(t.shape[1:])) for t in tensors]).encode()
    return zlib.crc32(text)


class SpecCache:
    """The spec of each (peer, key) this process has sent or received: identical at both ends.

    Each end records a spec when it sends or receives one; every message
    sent is received (a failed step still drains), so the two caches agree
    at the start of every step. A step whose peer was lost leaves the
    pipeline unusable, so a disagreement then never matters.
    """

    def __init__(self) -> None:
        self._specs: dict[tuple[int, Key], Spec] = {}

    def get(self, peer: int, key: Key) -> Spec | None:
        return self._specs.get((peer, key))

    def put(self, peer: int, key: Key, spec: Spec) -> None:
        self._specs[(peer, key)] = spec

    def __len__(self) -> int:
        return len(self._specs)


Irecv = Callable[[Tensor, int], Any]  # (buffer, part) -> a posted receive's work


class Inbound:
    """The receive side of one message: posted ahead, completed by whoever needs it first."""

    __slots__ = (
        "_buffer",
        "_data_part",
        "_device",
        "_header",
        "_irecv",
        "_spec",
        "_state",
        "_work",
        "arrived",
        "done",
        "error",
        "expected",
        "index",
        "key",
        "label",
        "nbytes",
        "peer",
        "posted",
        "structure",
        "taken",
        "values",
    )

    def __init__(self, peer: int, index: int, key: Key, expected: Spec | None, label: str,
                 device: torch.device | None = None):
        self.peer, self.index, self.key, self.expected, self.label = peer, index, key, expected, label
        self._device = device or torch.device("cpu")  # the wire's (see pipesched.distributed.staging)
        self._irecv: Irecv | None = None
        self._work: Any = None
        self._buffer: Tensor | None = None
        self._state = ""
        self._header: Header | None = None
        self._data_part = PAYLOAD
        self._spec: Spec | None = expected
        self.posted = False  # its first receive is posted
        self.done = False  # values or an error are here
        self.taken = False  # the compute thread took it
        self.values: tuple[Tensor | None, ...] | None = None
        self.structure: Structure | None = None
        self.error: str | None = None  # a peer's error description, in place of values
        self.arrived = 0.0  # perf_counter when its values (or error) were seen complete
        self.nbytes = 0

    def post(self, irecv: Irecv) -> None:
        """Post the first receive: the payload when the spec is known, else the spec."""
        self._irecv = irecv
        self.posted = True
        if self.expected is None:
            self._expect(HEADER, self._empty(HEADER_SLOTS, torch.int64), "header")
        else:
            self._expect(PAYLOAD, self._empty(payload_bytes(self.expected), torch.uint8), "payload")

    def _empty(self, size: int, dtype: torch.dtype) -> Tensor:
        return torch.empty(size, dtype=dtype, device=self._device)

    def _expect(self, part: int, buffer: Tensor, state: str) -> None:
        assert self._irecv is not None
        self._buffer, self._state = buffer, state
        self._work = self._irecv(buffer, part)

    def arrived_now(self) -> bool:
        """Whether its values are here (for the watchdog's diagnosis; never blocks).

        Runs on the watchdog's thread while the compute thread may clear
        ``_work``: read it once, so the check and the call see the same object.
        """
        if self.done:
            return self.error is None
        work = self._work
        return self._state == "payload" and work is not None and work.is_completed()

    def finish(self, specs: Any, left: Callable[[], float | None] | None = None) -> None:
        """Wait until values or an error are here (at most ``left()`` seconds per receive).

        ``specs`` (the :class:`SpecCache`) records a spec that arrives. A
        broken connection, or a deadline passed, raises gloo's ``RuntimeError``.
        """
        while not self.done:
            timeout = None if left is None else left()
            if timeout is None:
                self._work.wait()
            else:
                self._work.wait(timeout=timedelta(seconds=timeout))
            self._advance(specs)

    def _advance(self, specs: Any) -> None:
        """The receive posted last completed: read it, post the next one or finish."""
        buffer = self._buffer
        assert buffer is not None
        self.nbytes += buffer.numel() * buffer.element_size()
        if self._state == "header":
            header = decode(buffer)
            if header.status == ERROR:
                self._expect(ERROR_TEXT, self._empty(header.error_length, torch.uint8), "error")
            elif header.description_length:
                self._header = header
                self._expect(DESCRIPTION, self._empty(header.description_length, torch.uint8), "description")
            else:
                self._spec_arrived(specs, header.spec())
        elif self._state == "description":
            assert self._header is not None
            self._spec_arrived(specs, self._header.spec(buffer))
        elif self._state == "payload":
            status, aux = status_of(buffer)
            if status == OK:
                assert self._spec is not None
                self.values, self.structure = unpack(buffer, self._spec), self._spec[1]
                self._end()
            elif status == ERROR:
                self._expect(ERROR_TEXT, self._empty(aux, torch.uint8), "error")
            elif status == RESPEC:
                self._data_part = RESPEC_PAYLOAD
                self._expect(HEADER, self._empty(HEADER_SLOTS, torch.int64), "header")
            else:
                raise RuntimeError(f"message {self.label} from rank {self.peer} has an unknown status {status}")
        elif self._state == "error":
            self.error = bytes(buffer.tolist()).decode("utf-8", "replace")
            self._end()
        self.arrived = time.perf_counter()

    def _spec_arrived(self, specs: Any, spec: Spec) -> None:
        specs.put(self.peer, self.key, spec)
        self._spec = spec
        self._expect(self._data_part, self._empty(payload_bytes(spec), torch.uint8), "payload")

    def _end(self) -> None:
        self.done = True
        self._work = None
        self._buffer = None
