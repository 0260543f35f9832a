"""Point-to-point communication of one pipeline process, derived from the plan.

Every process computes the same plan, so every process knows, before a step
starts, exactly which messages it will send to and receive from each peer,
and in which order the peer produces them (the lowering's
:meth:`~pipesched.plan.lowering.Lowering.messages`, whatever stages they
connect). That is what makes the exchange deadlock-free without a handshake:

* **shapes once**: both ends keep the spec (dtypes, shapes, structure) of
  every kind of message, keyed by its lowering edge and the micro-batch's
  shape (:class:`~pipesched.distributed.inbound.SpecCache`). A message whose
  key is new this step carries a spec first; every other message is one
  packed buffer (:mod:`pipesched.distributed.wire`). Values that do not
  match the kept spec (a data-dependent shape) re-negotiate it in place.
* **receiving**: there is no receiver thread. Receives are posted ahead
  from the plan, a few messages per peer (:data:`RECEIVE_AHEAD`), so gloo
  lands the bytes while this rank computes; the compute thread takes a
  message when its task needs it (through a
  :class:`~pipesched.distributed.slots.RecvSlot`) and posts the next.
* **sending**: the compute thread posts a non-blocking send the moment an
  output exists (through a :class:`~pipesched.distributed.slots.SendSlot`).
* **failure**: a failing rank sends an *error* in place of every message it
  still owes. A receiver that gets one aborts its own step, fails, and sends
  errors for everything *it* owes, so the failure reaches every rank, and
  every posted receive is matched: no rank waits forever, no send stays
  pending.
* **waiting**: the compute thread waits inside gloo's receive, woken by
  gloo itself (no thread in between). An abort cannot wake it there, and
  need not: the plan is deadlock-free and every message a rank owes comes,
  as data or as an error, so the wait ends once the peer gets that far
  (an interrupted step, or one aborted by another rank's failure, stops at
  the next task boundary after it). Only a peer stuck in its own code keeps
  it waiting; then the watchdog raises ``StepStalled`` at ``stall_timeout``
  as for a stuck task, and the pipeline is unusable.
* **a lost peer**: a rank whose process died (its connection breaks) or that
  does not answer within ``stall_timeout`` is *lost*: a pending receive
  fails at once on a broken connection, :meth:`Communicator.finish` waits at
  most ``stall_timeout`` for what is still owed, errors go to the peers still
  reachable (saying "lost rank N", so they stop too), and the step raises
  :class:`PeerLost`. Gloo cannot wait on a receive for a while and then keep
  it (a timed-out receive closes the connection), so no receive is given a
  timeout of its own while the step is healthy; a peer that hangs in its own
  code ends this rank's step by its watchdog (``StepStalled``).

Every message goes through :meth:`Communicator._post_batch`, a
``torch.distributed.batch_isend_irecv`` of ``P2POp`` s (a message's parts in
one batch), whatever the backend: the gloo runs of the tests take the path
NCCL takes. Messages are packed and received on the device
:mod:`pipesched.distributed.staging` picks from (backend, device): this rank's
own device where the backend carries it (NCCL with CUDA tensors, gloo with
CPU ones), host memory only for CUDA tensors over gloo.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipesched.distributed.errors import (
    PeerLost,
    RemoteStepError,  # noqa: F401 - re-exported: public, importable here before
    lost,
    remote_error,
)
from pipesched.distributed.inbound import Inbound, Key, SpecCache, message_keys
from pipesched.distributed.slots import RecvSlot, SendSlot
from pipesched.distributed.staging import RECEIVE_AHEAD, receive_ahead, wire_device  # noqa: F401 - re-exported
from pipesched.distributed.wire import (
    DESCRIPTION,
    ERROR,
    ERROR_TEXT,
    HEADER,
    PAYLOAD,
    RESPEC,
    RESPEC_PAYLOAD,
    Spec,
    encode,
    encode_error,
    message_tag,
    pack,
    spec_of,
    status_payload,
)
from pipesched.observe.report import CommRecord
from pipesched.plan.lowering import SKIP, Lowering, Transfer
from pipesched.runtime.mailbox import Mailbox, StepAborted
from pipesched.runtime.structure import Structure

@dataclass
class Outbound:
    """One message this rank owes a peer in this step."""

    peer: int
    index: int  # the transfer's position in the lowering: its tags
    key: Key
    expected: Spec | None  # the spec both ends kept for ``key`` when the step began (None: send one)
    label: str


@dataclass
class StepLink:
    """The communication state of one step on this rank."""

    step: int
    mailbox: Mailbox
    outgoing: dict[Transfer, Outbound]
    incoming: dict[int, list[Inbound]]  # peer -> its messages, in its production order
    sent: set[Transfer] = field(default_factory=set)
    works: list[tuple[Any, Any, int]] = field(default_factory=list)  # (work, tensor kept alive, peer)
    records: list[CommRecord] = field(default_factory=list)
    lost: dict[int, str] = field(default_factory=dict)  # peer -> why it is unreachable
    cursor: dict[int, int] = field(default_factory=dict)  # peer -> next message to post ahead
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tag(self, index: int, part: int) -> int:
        return message_tag(self.step, index, part)


class Communicator:
    """Sends and receives the messages of a plan for the rank this process runs."""

    def __init__(self, group: Any, rank: int, world: int, device: torch.device):
        self.group = group
        self.rank = rank
        self.world = world
        self.device = device
        backend = dist.get_backend(group)
        #: where messages are packed, sent and received (:func:`~pipesched.distributed.staging.wire_device`)
        self.wire = wire_device(backend, device)
        self.ahead = receive_ahead(backend, device)
        self._global = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)]
        self.specs = SpecCache()
        self.specs_sent = 0  # messages sent with a spec (a new key, or a re-spec): shapes crossing
        self.respecs_sent = 0  # of those, specs a kept one did not predict (a data-dependent shape)
        self._routes: dict[int, tuple[Lowering, dict[int, list[tuple[int, Transfer]]],
                                      dict[int, list[tuple[int, Transfer]]]]] = {}

    # -------------------------------------------------------------------- steps

    def _routes_of(self, lowering: Lowering) -> tuple[dict[int, list[tuple[int, Transfer]]],
                                                      dict[int, list[tuple[int, Transfer]]]]:
        """Per peer, (index, transfer) of what this rank sends it and receives from it (once per lowering)."""
        cached = self._routes.get(id(lowering))
        if cached is not None and cached[0] is lowering:
            return cached[1], cached[2]
        index = {t: i for i, t in enumerate(lowering.transfers)}
        peers = [p for p in range(self.world) if p != self.rank]
        out = {p: [(index[t], t) for t in lowering.messages(self.rank, p)] for p in peers}
        into = {p: [(index[t], t) for t in lowering.messages(p, self.rank)] for p in peers}
        self._routes[id(lowering)] = (lowering, out, into)
        return out, into

    def begin(self, step: int, lowering: Lowering, mailbox: Mailbox, shapes: list[Any]) -> StepLink:
        """Post this step's first receives; return the link sends and receives go through.

        ``shapes[m]`` names micro-batch m's shape (every rank passes the same);
        with the lowering edge it keys the specs both ends keep. What this
        rank sends each peer, and receives from it, in which order, is the
        plan's lowering: every process computes the same plan, so both ends
        agree without a handshake.
        """
        out, into = self._routes_of(lowering)
        outgoing: dict[Transfer, Outbound] = {}
        for peer, transfers in out.items():
            for (index, transfer), key in zip(transfers, message_keys([t for _, t in transfers], shapes)):
                outgoing[transfer] = Outbound(peer, index, key, self.specs.get(peer, key), _label(transfer, lowering))
        link = StepLink(step, mailbox, outgoing, {})
        for transfer in outgoing:
            mailbox.replace(transfer, SendSlot(mailbox, partial(self.send, link, transfer)))
        for peer, transfers in into.items():
            keys = message_keys([t for _, t in transfers], shapes)
            link.incoming[peer] = [
                Inbound(peer, index, key, self.specs.get(peer, key), _label(transfer, lowering), self.wire)
                for (index, transfer), key in zip(transfers, keys)
            ]
            for (_, transfer), inbound in zip(transfers, link.incoming[peer]):
                mailbox.replace(transfer, RecvSlot(mailbox, partial(self.take, link, inbound), inbound))
            link.cursor[peer] = 0
            self._post_ahead(link, peer)
        return link

    def _post(self, link: StepLink, inbound: Inbound) -> None:
        inbound.post(self._irecv(link, inbound))

    def _irecv(self, link: StepLink, inbound: Inbound) -> Any:
        peer = self._global[inbound.peer]

        def irecv(tensor: Tensor, part: int) -> Any:
            tag = link.tag(inbound.index, part)
            return self._post_batch([dist.P2POp(dist.irecv, tensor, peer, self.group, tag)])[0]

        return irecv

    def _post_ahead(self, link: StepLink, peer: int) -> None:
        """Keep the peer's next :data:`RECEIVE_AHEAD` messages (in its production order) posted."""
        messages = link.incoming[peer]
        at = link.cursor[peer]
        while at < len(messages) and messages[at].taken:
            at += 1
        link.cursor[peer] = at
        for inbound in messages[at:at + self.ahead]:
            if not inbound.posted:
                self._post(link, inbound)

    def take(self, link: StepLink, inbound: Inbound) -> tuple[tuple[Tensor | None, ...], Structure]:
        """On the compute thread: wait for ``inbound``'s values (a step's error raises ``StepAborted``)."""
        mailbox = link.mailbox
        if mailbox.aborted:
            raise StepAborted(mailbox.abort_reason)
        if not inbound.posted:
            self._post(link, inbound)
        began = time.perf_counter()
        try:
            inbound.finish(self.specs)
        except RuntimeError as error:  # the connection broke (the peer's process is gone)
            why = f"lost the connection to it: {error}"
            link.lost.setdefault(inbound.peer, why)
            mailbox.abort(lost(inbound.peer, why))
            raise StepAborted(mailbox.abort_reason) from error
        inbound.taken = True
        if inbound.error is not None:
            mailbox.abort(remote_error(inbound.error))
            raise StepAborted(mailbox.abort_reason)
        if mailbox.aborted:
            raise StepAborted(mailbox.abort_reason)
        self._post_ahead(link, inbound.peer)
        link.records.append(CommRecord(self.rank, inbound.peer, "recv", inbound.label, min(began, inbound.arrived),
                                       inbound.arrived, inbound.nbytes))
        values, structure = inbound.values, inbound.structure
        inbound.values = None  # the consumer's now: a slot hands its value over once
        if self.wire != self.device:  # staged through host memory
            values = tuple(None if v is None else v.to(self.device) for v in values)
        return values, structure  # type: ignore[return-value]

    def send(self, link: StepLink, transfer: Transfer, values: tuple[Tensor | None, ...],
             structure: Structure) -> None:
        """Post ``transfer``'s message: one packed payload, after a spec when the peer lacks it."""
        message = link.outgoing[transfer]
        start = time.perf_counter()
        wire = tuple(None if v is None else v.detach().to(self.wire).contiguous() for v in values)
        spec = spec_of(wire, structure)
        payload = pack(wire, spec, self.wire)
        if message.expected is None:  # the first message of its key: the spec first
            parts = [*_spec_parts(wire, structure), (PAYLOAD, payload)]
            self.specs.put(message.peer, message.key, spec)
            self.specs_sent += 1
        elif message.expected == spec:
            parts = [(PAYLOAD, payload)]
        else:  # not what the peer posted for: say so in the posted buffer, then re-spec
            parts = [(PAYLOAD, status_payload(message.expected, RESPEC)), *_spec_parts(wire, structure),
                     (RESPEC_PAYLOAD, payload)]
            self.specs.put(message.peer, message.key, spec)
            self.specs_sent += 1
            self.respecs_sent += 1
        with link.lock:
            if transfer in link.sent:
                return
            link.sent.add(transfer)
            self._isend(link, message, parts)
            _prune(link.works)
        link.records.append(CommRecord(self.rank, message.peer, "send", message.label, start, time.perf_counter(),
                                       payload.numel()))

    def _isend(self, link: StepLink, message: Outbound, parts: list[tuple[int, Tensor]]) -> None:
        """Post ``parts`` to the peer (under ``link.lock``); a broken connection is a lost peer."""
        peer = message.peer
        parts = [(part, tensor.to(self.wire)) for part, tensor in parts]  # headers and texts are built on the host
        try:
            works = self._post_batch([dist.P2POp(dist.isend, tensor, self._global[peer], self.group,
                                                 link.tag(message.index, part)) for part, tensor in parts])
            for work in works:
                link.works.append((work, [t for _, t in parts], peer))
        except RuntimeError as error:  # the connection to the peer is broken
            why = f"cannot send to it ({error})"
            link.lost.setdefault(peer, why)
            raise lost(peer, why) from error

    @staticmethod
    def _post_batch(ops: list[Any]) -> list[Any]:
        """Post ``ops`` (``P2POp`` s) as one batch: NCCL coalesces them, gloo posts each. The one place
        this rank's messages leave and arrive, whatever the backend."""
        return dist.batch_isend_irecv(ops)

    def fail(self, link: StepLink, message: str) -> None:
        """Send an error in place of every message this rank still owes in this step.

        A peer whose connection is broken gets none (it is recorded as lost);
        the others still get theirs.
        """
        header, text = encode_error(message)
        with link.lock:
            for transfer, outbound in link.outgoing.items():
                if transfer in link.sent or outbound.peer in link.lost:
                    continue
                link.sent.add(transfer)
                if outbound.expected is None:  # the peer posted for a spec: the error header goes there
                    parts = [(HEADER, header), (ERROR_TEXT, text)]
                else:  # the peer posted a payload: an error status of the same size
                    parts = [(PAYLOAD, status_payload(outbound.expected, ERROR, text.numel())), (ERROR_TEXT, text)]
                try:
                    self._isend(link, outbound, parts)
                except PeerLost:
                    pass

    def finish(self, link: StepLink, timeout: float | None = None) -> PeerLost | None:
        """Wait until every message of the step is received and every send delivered.

        Waits at most ``timeout`` seconds in all (``None``: no limit). Returns
        the :class:`PeerLost` error naming a peer that died or did not answer
        in time, or ``None`` when every peer was heard from.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0.001)

        for peer, messages in link.incoming.items():
            for inbound in messages:
                if peer in link.lost:
                    break
                if inbound.done:
                    continue
                try:
                    if not inbound.posted:
                        self._post(link, inbound)
                    inbound.finish(self.specs, left)
                except RuntimeError as error:  # broken connection, or nothing within the deadline
                    if deadline is not None and time.monotonic() >= deadline - 0.01:
                        link.lost.setdefault(peer, f"sent nothing for {timeout:.1f} s (stall_timeout) while "
                                                   f"this rank waited for its messages")
                    else:
                        link.lost.setdefault(peer, f"lost the connection to it: {error}")
        for work, _, peer in link.works:
            if peer in link.lost:
                continue  # a send to a lost peer may never complete
            try:
                work.wait() if deadline is None else work.wait(timeout=timedelta(seconds=left()))
            except RuntimeError as error:  # broken connection, or not delivered in time
                link.lost.setdefault(peer, f"a message to it was not delivered ({error})")
        link.works.clear()
        if not link.lost:
            return None
        peer = min(link.lost)
        return lost(peer, link.lost[peer])

    def close(self, timeout: float = 5) -> None:
        """Nothing runs between steps (no receiver threads): kept for the pipeline's lifecycle."""


def _label(transfer: Transfer, lowering: Lowering) -> str:
    """A message's name in ``last_comm`` and the "comm" events: its producing action, ``F2.1``.

    A skip connection's message is named by its skip edge instead (the
    producing action also sends its ordinary output): ``S<edge>.<m>`` for the
    stashed tensors, ``T<edge>.<m>`` for their gradients, with ``<edge>`` the
    edge's index in the lowering's skips (the same on every rank).
    """
    producer = transfer.producer
    if transfer.edge.skip is not None:
        kind = "S" if transfer.carries == SKIP else "T"
        return f"{kind}{lowering.skips.index(transfer.edge.skip)}.{producer.microbatch}"
    return f"{producer.kind}{producer.stage}.{producer.microbatch}"


def _spec_parts(wire: tuple[Tensor | None, ...], structure: Structure) -> list[tuple[int, Tensor]]:
    header, description = encode(wire, structure)
    return [(HEADER, header)] + ([] if description is None else [(DESCRIPTION, description)])


def _prune(works: list[tuple[Any, Any, int]]) -> None:
    """Forget sends already delivered (their buffers can go), so a step holds only those in flight."""
    if len(works) < 8:
        return
    keep = []
    for entry in works:
        work = entry[0]
        if work.is_completed() and work.is_success():
            continue
        keep.append(entry)
    works[:] = keep
