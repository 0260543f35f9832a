"""Which memory a message crosses in: the decision, from (backend, device), in one place.

A process group's backend may carry tensors of some device types and not of
others: gloo sends and receives CPU tensors only, NCCL CUDA tensors only, and
a combined backend (``"cpu:gloo,cuda:nccl"``, what ``init_process_group()``
picks by itself on a machine with GPUs) routes each device type to its own.
The transport (:mod:`pipesched.distributed.comm`) asks this module once, when
the pipeline is built, and then runs one code path whatever the answer:

* the backend carries this rank's device: messages are packed, sent and
  received on the device itself (NCCL with CUDA tensors; gloo with CPU
  tensors, the path every CPU test runs);
* it does not (gloo with CUDA tensors): messages are staged through host
  memory, one copy each way.

NCCL matches point-to-point messages by order, not by tag (gloo honours
tags), so over NCCL only one message per peer is posted ahead.
"""

from __future__ import annotations

import torch

#: Receives posted ahead per peer over gloo: enough that a producer never waits for this rank to post
#: (1F1B keeps at most a couple of messages in flight per pair), few enough that the step's
#: receive buffers stay bounded by the schedule, not by the number of micro-batches.
RECEIVE_AHEAD = 4


def backend_for(backend: str, device_type: str) -> str | None:
    """The backend that carries ``device_type`` tensors in ``backend`` (``None``: none does).

    ``backend`` is ``torch.distributed.get_backend(group)``: ``"gloo"``,
    ``"nccl"``, or a combined ``"cpu:gloo,cuda:nccl"``.
    """
    backend = backend.lower()
    if ":" in backend:
        routes = dict(part.split(":", 1) for part in backend.split(",") if ":" in part)
        return routes.get(device_type)
    if backend == "gloo":
        return "gloo" if device_type in ("cpu", "cuda") else None  # gloo reduces CUDA tensors, sends CPU ones
    if backend == "nccl":
        return "nccl" if device_type == "cuda" else None
    return backend


def stages_through_host(backend: str, device: torch.device) -> bool:
    """Whether messages of a rank on ``device`` cross through host memory: only a device the backend
    cannot send and receive directly (CUDA tensors over gloo)."""
    return device.type != "cpu" and backend_for(backend, device.type) in (None, "gloo")


def wire_device(backend: str, device: torch.device) -> torch.device:
    """The device messages are packed, sent and received on."""
    return torch.device("cpu") if stages_through_host(backend, device) else device


def receive_ahead(backend: str, device: torch.device) -> int:
    """Messages per peer to post ahead: several where the carrying backend matches by tag (gloo), one
    where it matches by order (NCCL)."""
    return RECEIVE_AHEAD if backend_for(backend, wire_device(backend, device).type) == "gloo" else 1


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse, naming the fix, a backend this pipeline cannot run on with ``device``.

    The framing collectives (the batch agreement, the end-of-step exchange)
    use small CPU tensors, so the group must carry CPU tensors (gloo, or a
    combined backend with ``cpu:gloo``); the messages go on ``device`` where
    the backend carries it.
    """
    if backend_for(backend, "cpu") != "gloo":
        raise NotImplementedError(
            f"DistributedPipeline exchanges a few numbers per step in CPU tensors, which the {backend!r} process "
            "group cannot carry: initialise it with init_process_group('cpu:gloo,cuda:nccl') (what "
            "init_process_group() picks on a machine with GPUs; messages then travel over NCCL on the GPU) or 'gloo'"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={str(device)!r} but this process sees no CUDA device; pass device='cpu' "
                           "or run where a GPU is visible")
    if device.type != "cpu" and backend_for(backend, device.type) is None:
        raise NotImplementedError(f"the {backend!r} process group carries no {device.type} tensors: pass "
                                  "device='cpu' or a backend for that device")


__all__ = ["RECEIVE_AHEAD", "backend_for", "check_backend", "receive_ahead", "stages_through_host", "wire_device"]
