"""CUDA streams and events with a CPU stand-in, so one code path runs everywhere.

On a CUDA device each rank computes on its own stream and transfers use a copy
stream, ordered by events. On the CPU every stream is ``None`` and every
function here is a no-op: CPU kernels run synchronously on the calling
thread, so program order already is data order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch


def new_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A fresh stream on ``device`` (``None`` on the CPU)."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


@contextlib.contextmanager
def use_device(device: torch.device, stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Make ``device`` and ``stream`` current for the calling thread."""
    if stream is None:
        yield
        return
    with torch.cuda.device(device), torch.cuda.stream(stream):
        yield


def record_event(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event marking everything queued on ``stream`` so far (``None`` on the CPU)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def wait_event(stream: torch.cuda.Stream | None, event: torch.cuda.Event | None) -> None:
    """Make ``stream`` wait, on the device, for ``event``; the host does not block."""
    if stream is not None and event is not None:
        stream.wait_event(event)


def keep_alive(tensors: tuple[torch.Tensor | None, ...], stream: torch.cuda.Stream | None) -> None:
    """Tell the caching allocator that ``stream`` uses ``tensors`` (``record_stream``).

    Without it, memory allocated on one stream and freed while another stream
    still reads it could be handed out again too early.
    """
    if stream is None:
        return
    for tensor in tensors:
        if tensor is not None and tensor.is_cuda:
            tensor.record_stream(stream)


class StreamFence:
    """Orders every rank's stream after the caller's, and the caller's after every rank's, per step.

    The caller computes on its *current* stream of each device (the default
    stream unless it chose another); ranks compute on their own streams. A
    step is fenced on both sides, without blocking the host::

        caller stream   ─ x = ... ─●begin                          ┌wait(end 0..n)─ optimizer.step(), loss.item()
        rank r stream               ╰wait(begin)─ F/B tasks of r ─●end r ┘

    * ``begin``: recorded on the caller's current stream of every CUDA device
      a rank uses, when the step starts; each rank's stream waits for its
      device's event before its first task, so inputs the caller produced (on
      its stream) and its last ``optimizer.step()`` are complete before any
      rank reads them.
    * ``end r``: recorded on rank r's stream after its last task (also after a
      failure); the caller's current stream of every device waits for all of
      them before ``step()`` returns, so the loss, gathered outputs, input
      gradients and ``.grad`` are safe to use on the caller's stream.

    Memory that a rank's stream allocated and the caller frees (``.grad`` set
    to ``None``, the returned loss) returns to that rank stream's pool; the
    rank stream can only reuse it in a later step, after waiting for that
    step's ``begin``, i.e. after every caller kernel queued before it, which
    is what ``record_stream`` would otherwise have to promise.
    On the CPU every stream is ``None`` and the fence does nothing.
    """

    def __init__(self, devices: list[torch.device]):
        self.cuda_devices = sorted({d for d in devices if d.type == "cuda"}, key=lambda d: d.index)
        self.begin: dict[int, torch.cuda.Event] = {}
        self.ends: list[torch.cuda.Event] = []

    def enter(self) -> None:
        """On the caller's thread, as the step starts."""
        self.begin = {d.index: record_event(torch.cuda.current_stream(d)) for d in self.cuda_devices}  # type: ignore[misc]
        self.ends = []

    def rank_begins(self, device: torch.device, stream: torch.cuda.Stream | None) -> None:
        """On a rank's worker, before its first task."""
        if stream is not None:
            wait_event(stream, self.begin.get(device.index))

    def rank_ends(self, stream: torch.cuda.Stream | None) -> None:
        """On a rank's worker, after its last task (or its failure)."""
        if stream is not None:
            self.ends.append(record_event(stream))  # type: ignore[arg-type]

    def exit(self) -> None:
        """On the caller's thread, once every rank is done: the caller's streams wait for all ranks."""
        for device in self.cuda_devices:
            caller = torch.cuda.current_stream(device)
            for event in self.ends:
                caller.wait_event(event)


class TaskClock:
    """When a rank's tasks ran: host times, and on CUDA the device's times placed on the host clock.

    On the CPU a task runs while its thread runs, so ``time.perf_counter()``
    at its start and end is its time. On a CUDA device the host only
    *enqueues* kernels; the task runs later, on the rank's stream. So each
    start and end also records a timing event on the stream; :meth:`finish`
    waits for the rank's last event and converts every event to the host
    clock through a reference event recorded (and waited for) when the rank
    began, while its stream was idle. The timeline, the replay and the
    watchdog's report then see what the device did.
    """

    def __init__(self, stream: torch.cuda.Stream | None):
        self.stream = stream
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: torch.cuda.Event | None = None
        self._reference: torch.cuda.Event | None = None
        self._reference_time = 0.0
        if stream is not None:
            self._reference = self._event()
            self._reference.synchronize()
            self._reference_time = time.perf_counter()

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def start(self, host: float | None = None) -> float:
        """Mark a task's start; return its host time (``host`` if given)."""
        if self.stream is not None:
            self._start = self._event()
        return time.perf_counter() if host is None else host

    def end(self) -> float:
        """Mark the end of the task started last; return the host time."""
        if self.stream is not None:
            self.events.append((self._start or self._event(), self._event()))
            self._start = None
        return time.perf_counter()

    def finish(self, records: list[Any], first: int) -> None:
        """Replace ``records[first:]`` (this rank's, in order) by device times. No-op on the CPU."""
        if self.stream is None or not self.events:
            return
        self.events[-1][1].synchronize()
        reference, base = self._reference, self._reference_time
        for index, (start, end) in enumerate(self.events):
            record = records[first + index]
            records[first + index] = replace(
                record,
                start=base + reference.elapsed_time(start) / 1e3,  # type: ignore[union-attr]
                end=base + reference.elapsed_time(end) / 1e3,  # type: ignore[union-attr]
            )
