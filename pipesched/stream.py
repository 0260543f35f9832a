"""CUDA streams and events with a CPU stand-in, so one code path runs everywhere.

On a CUDA device each rank computes on its own stream and transfers use a copy
stream, ordered by events. On the CPU every stream is ``None`` and every
function here is a no-op: CPU kernels run synchronously on the calling
thread, so program order already is data order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
