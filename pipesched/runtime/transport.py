"""Move activations and gradients between ranks of one process.

The producer calls :meth:`Transport.send` right after computing, so a
cross-device copy starts on the copy stream while the producer's compute stream
moves on; the consumer calls :meth:`Transport.receive`, which makes its compute
stream wait for the copy on the device without blocking the host. On the CPU
both are the identity (ranks share memory).

::

    producer compute ──●                       (event: value computed)
    producer copy         ╰─wait─► copy to dst ──●   (event: copy done)
    consumer compute                               ╰─wait─► use value
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipesched.runtime.stream import (
    keep_alive,
    new_stream,
    record_event,
    use_device,
    wait_event,
)

Values = tuple[Tensor | None, ...]


@dataclass(frozen=True)
class Packet:
    """Values already on the consumer's device, plus the event that says they are ready."""

    values: Values
    ready: torch.cuda.Event | None


class Transport:
    """Copies between the devices of ranks; one copy stream per rank on CUDA."""

    def __init__(self, devices: list[torch.device], compute_streams: list[torch.cuda.Stream | None]):
        self.devices = devices
        self.compute_streams = compute_streams
        self.copy_streams = [new_stream(device) for device in devices]

    def send(self, values: Values, src: int, dst: int) -> Packet:
        """Called on ``src``'s worker: ship detached ``values`` to ``dst``'s device."""
        values = tuple(None if v is None else v.detach() for v in values)
        compute = self.compute_streams[src]
        if compute is None and self.devices[dst].type == "cpu":
            return Packet(values, None)
        copy = self.copy_streams[src] or self.compute_streams[dst]
        wait_event(copy, record_event(compute))
        with use_device(self.devices[src] if compute is not None else self.devices[dst], copy):
            moved = tuple(
                None if v is None else v.to(self.devices[dst], non_blocking=True) for v in values
            )
        keep_alive(values, copy)
        return Packet(moved, record_event(copy))

    def receive(self, packet: Packet, dst: int) -> Values:
        """Called on ``dst``'s worker: order its compute stream after the copy.

        A CPU rank has no stream to order, so it waits for a device-to-host
        copy on the host: ``non_blocking`` copies to the CPU return before the
        bytes have landed.
        """
        stream = self.compute_streams[dst]
        if stream is None and packet.ready is not None:
            packet.ready.synchronize()
        wait_event(stream, packet.ready)
        keep_alive(packet.values, stream)
        return packet.values
