"""Point-to-point communication of one pipeline process, derived from the plan.

Every process computes the same plan, so every process knows, before a step
starts, exactly which messages it will send to and receive from each peer,
and in which order the peer produces them. That is what makes the exchange
deadlock-free without any handshake:

* **receiving**: one thread per peer receives that peer's messages in the
  order the peer produces them (its plan order): header, then tensors. It
  files each into the local mailbox slot the compute thread waits on, so
  receives overlap compute and the compute thread's waits stay abortable.
* **sending**: the compute thread posts a non-blocking send the moment an
  output exists (:class:`SendSlot`), header then tensors.
* **failure**: a failing rank sends an *error header* for every message it
  still owes. A receiver that gets one aborts its own step, fails, and sends
  error headers for everything *it* owes, so the failure reaches every rank,
  and every posted receive is matched: no rank waits forever, no send stays
  pending. Receivers keep draining after an error for the same reason.
* **a lost peer**: a rank whose process died (its connection breaks) or that
  does not answer within ``stall_timeout`` is *lost*: a pending receive
  fails at once on a broken connection, :meth:`Communicator.finish` waits at
  most ``stall_timeout`` for what is still owed, error headers go to the
  peers still reachable (saying "lost rank N", so they stop too), and the
  step raises :class:`PeerLost`. Gloo cannot wait on a receive for a while
  and then keep it (a timed-out receive closes the connection), so no
  receive is given a timeout of its own while the step is healthy: the
  watchdog bounds the waits of the compute thread, ``finish`` the rest.

Gloo (CPU) is the transport tested here; tensors on a CUDA device are staged
through host memory for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipesched.plan.lowering import SKIP, Lowering, SkipEdge, Transfer
from pipesched.runtime.mailbox import Mailbox, Slot
from pipesched.observe.report import CommRecord
from pipesched.runtime.structure import Structure
from pipesched.runtime.transport import Packet
from pipesched.distributed.wire import (
    ERROR,
    HEADER_SLOTS,
    decode,
    encode,
    encode_error,
    message_tag,
)
from pipesched.runtime.worker import Worker


class RemoteStepError(RuntimeError):
    """Another rank of the pipeline failed during this step; the message says where and why."""


class PeerLost(RemoteStepError):
    """A rank of the pipeline died or stopped answering during this step; the message names it.

    Messages of the step may be lost or still in flight, so the pipeline (and
    the process group) cannot be used again: restart the job.
    """

    MARK = "lost rank "  # every message starts with it, so it survives travelling as an error header


def lost(peer: int, why: str) -> PeerLost:
    return PeerLost(f"{PeerLost.MARK}{peer}: {why}")


MessageKey = tuple[str, int, int]  # the producing action: (kind, stage, microbatch)


def message_key(transfer: Transfer, skips: Sequence[SkipEdge] = ()) -> MessageKey:
    """The name of a transfer on the wire: the action that produced it (tags derive from it).

    A skip connection's transfer is named by its edge's index in ``skips``
    (the lowering's, the same on every rank) instead: ``("S", index, m)`` for
    the stashed tensors, ``("T", index, m)`` for their gradients, since the
    producing action also sends its ordinary output.
    """
    producer = transfer.producer
    if transfer.edge.skip is not None:
        return ("S" if transfer.carries == SKIP else "T", skips.index(transfer.edge.skip), producer.microbatch)
    return (producer.kind, producer.stage, producer.microbatch)


@dataclass
class StepLink:
    """The communication state of one step on this rank."""

    step: int
    num_stages: int
    num_microbatches: int
    outgoing: dict[int, list[MessageKey]]
    num_skips: int = 0
    sent: set[MessageKey] = field(default_factory=set)
    works: list[tuple[Any, Any, int]] = field(default_factory=list)  # (work, tensor kept alive, peer)
    records: list[CommRecord] = field(default_factory=list)
    receivers_done: dict[int, threading.Event] = field(default_factory=dict)  # peer -> drained
    lost: dict[int, str] = field(default_factory=dict)  # peer -> why it is unreachable
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tag(self, key: MessageKey, part: int) -> int:
        return message_tag(self.step, key[0], key[1], key[2], self.num_stages, self.num_microbatches, part,
                           self.num_skips)


class Communicator:
    """Sends and receives the messages of a plan for the rank this process runs."""

    def __init__(self, group: Any, rank: int, world: int, device: torch.device):
        self.group = group
        self.rank = rank
        self.world = world
        self.device = device
        self._global = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)]
        self._receivers = {
            peer: Worker(peer, torch.device("cpu"), name=f"pipesched-recv{peer}")
            for peer in range(world) if peer != rank
        }
        self.clock_offset = 0.0

    # ------------------------------------------------------------------ clocks

    def measure_clock_offset(self, rounds: int = 16, warmup: int = 4) -> float:
        """This process's ``perf_counter`` minus rank 0's (NTP-style, least-delay sample).

        Every rank's timeline is shifted onto rank 0's clock, so merged
        timelines line up across processes and hosts. The first round trips
        also set up connections and are slow, so ``warmup`` of them are
        discarded; the error of the estimate is at most half the smallest
        round-trip delay seen.
        """
        clock = time.perf_counter
        if self.rank == 0:
            for peer in range(1, self.world):
                for _ in range(warmup + rounds):
                    probe = torch.zeros(1, dtype=torch.float64)
                    dist.recv(probe, src=self._global[peer], group=self.group, tag=0)
                    received = clock()
                    dist.send(torch.tensor([received, clock()], dtype=torch.float64),
                              dst=self._global[peer], group=self.group, tag=1)
            return 0.0
        best = (float("inf"), 0.0)
        for round_ in range(warmup + rounds):
            t0 = clock()
            dist.send(torch.tensor([t0], dtype=torch.float64), dst=self._global[0], group=self.group, tag=0)
            reply = torch.zeros(2, dtype=torch.float64)
            dist.recv(reply, src=self._global[0], group=self.group, tag=1)
            t3 = clock()
            t1, t2 = reply.tolist()
            delay = (t3 - t0) - (t2 - t1)
            offset = ((t0 - t1) + (t3 - t2)) / 2
            if round_ >= warmup:
                best = min(best, (delay, offset))
        self.clock_offset = best[1]
        return self.clock_offset

    # -------------------------------------------------------------------- steps

    def begin(self, step: int, lowering: Lowering, mailbox: Mailbox) -> StepLink:
        """Start receiving this step's messages; return the link sends go through.

        What this rank sends each peer, and receives from it, in which order,
        is the plan's lowering (:meth:`~pipesched.plan.lowering.Lowering.messages`):
        every process computes the same plan, so both ends agree without a handshake.
        """
        skips = lowering.skips
        link = StepLink(step, lowering.num_stages, lowering.num_microbatches, {
            peer: [message_key(t, skips) for t in lowering.messages(self.rank, peer)] for peer in self._receivers
        }, len(skips))
        for peer in self._receivers:
            for transfer in lowering.messages(self.rank, peer):
                mailbox.replace(transfer, SendSlot(mailbox, self, link, message_key(transfer, skips)))
        for peer, receiver in self._receivers.items():
            expected = lowering.messages(peer, self.rank)
            done = threading.Event()
            link.receivers_done[peer] = done
            receiver.submit(lambda p=peer, e=expected, d=done: self._receive(link, mailbox, p, e, d, skips))
        return link

    def send(self, link: StepLink, key: MessageKey, values: tuple[Tensor | None, ...],
             structure: Structure) -> None:
        """Post the message ``key`` (header, tensors, a mapping's description) to its consumer."""
        peer = next(p for p, keys in link.outgoing.items() if key in keys)
        start = time.perf_counter()
        wire = tuple(None if v is None else v.detach().to("cpu").contiguous() for v in values)
        header, description = encode(wire, structure)
        parts = [header, *(v for v in wire if v is not None)]
        indices = [0, *(i + 1 for i, v in enumerate(wire) if v is not None)]
        if description is not None:
            parts.append(description)
            indices.append(len(wire) + 1)
        with link.lock:
            if key in link.sent:
                return
            link.sent.add(key)
            for index, tensor in zip(indices, parts):
                work = dist.isend(tensor, dst=self._global[peer], group=self.group, tag=link.tag(key, index))
                link.works.append((work, tensor, peer))
        link.records.append(CommRecord(self.rank, peer, "send", "%s%d.%d" % key, start, time.perf_counter(),
                                       sum(t.numel() * t.element_size() for t in parts[1:])))

    def fail(self, link: StepLink, message: str) -> None:
        """Send an error header for every message this rank still owes in this step.

        A peer whose connection is broken gets none (it is recorded as lost);
        the others still get theirs.
        """
        header, data = encode_error(message)
        with link.lock:
            for peer, keys in link.outgoing.items():
                for key in keys:
                    if key in link.sent or peer in link.lost:
                        continue
                    link.sent.add(key)
                    try:
                        for index, tensor in ((0, header), (1, data)):
                            work = dist.isend(tensor, dst=self._global[peer], group=self.group,
                                              tag=link.tag(key, index))
                            link.works.append((work, tensor, peer))
                    except RuntimeError as error:  # the connection to the peer is broken
                        link.lost.setdefault(peer, f"cannot send to it ({error})")

    def finish(self, link: StepLink, timeout: float | None = None) -> PeerLost | None:
        """Wait until every send of the step is delivered and every receiver has drained.

        Waits at most ``timeout`` seconds in all (``None``: no limit). Returns
        the :class:`PeerLost` error naming a peer that died or did not answer
        in time, or ``None`` when every peer was heard from.
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0.001)

        for peer, done in link.receivers_done.items():
            if not done.wait(left()):
                link.lost.setdefault(peer, f"sent nothing for {timeout:.1f} s (stall_timeout) while this "
                                           f"rank waited for its messages")
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

    def _receive(self, link: StepLink, mailbox: Mailbox, peer: int, expected: list[Transfer],
                 done: threading.Event, skips: Sequence[SkipEdge] = ()) -> None:
        try:
            for transfer in expected:
                key = message_key(transfer, skips)
                header = torch.empty(HEADER_SLOTS, dtype=torch.int64)
                self._recv(header, peer, link.tag(key, 0))
                start = time.perf_counter()
                parsed = decode(header)
                if parsed.status == ERROR:
                    data = torch.empty(parsed.error_length, dtype=torch.uint8)
                    self._recv(data, peer, link.tag(key, 1))
                    text = bytes(data.tolist()).decode("utf-8", "replace")
                    mailbox.abort((PeerLost if text.startswith(PeerLost.MARK) else RemoteStepError)(text))
                    continue
                buffers = parsed.allocate(torch.device("cpu"))
                for index, buffer in enumerate(buffers):
                    if buffer is not None:
                        self._recv(buffer, peer, link.tag(key, index + 1))
                description = None
                if parsed.description_length:
                    description = torch.empty(parsed.description_length, dtype=torch.uint8)
                    self._recv(description, peer, link.tag(key, parsed.description_part))
                values = tuple(None if b is None else b.to(self.device) for b in buffers)
                mailbox.slot(transfer).put((Packet(values, None), parsed.structure(description)))
                link.records.append(CommRecord(
                    self.rank, peer, "recv", "%s%d.%d" % key, start, time.perf_counter(),
                    sum(b.numel() * b.element_size() for b in (*buffers, description) if b is not None)))
        except BaseException as error:  # noqa: BLE001 - a broken connection: abort, never hang
            why = f"lost the connection to it: {error}"
            link.lost.setdefault(peer, why)
            mailbox.abort(lost(peer, why))
        finally:
            done.set()

    def _recv(self, tensor: Tensor, peer: int, tag: int) -> None:
        dist.irecv(tensor, src=self._global[peer], group=self.group, tag=tag).wait()

    def close(self, timeout: float = 5) -> None:
        """Stop the receiver threads, waiting up to ``timeout`` for each (one blocked on a lost peer never ends)."""
        for receiver in self._receivers.values():
            receiver.close(timeout=timeout)


class SendSlot(Slot):
    """A mailbox slot whose consumer lives in another process: ``put`` sends it."""

    def __init__(self, mailbox: Mailbox, communicator: Communicator, link: StepLink, key: MessageKey):
        super().__init__(mailbox)
        self._send = lambda values, structure: communicator.send(link, key, values, structure)

    def put(self, value: Any) -> None:
        packet, structure = value
        self._send(packet.values, structure)
