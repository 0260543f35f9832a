"""Many tensors through one gloo collective: flatten into a host buffer, run it, copy the result back.

Gloo works on host tensors, and one message per tensor costs a round trip
each: tied weights (:mod:`pipesched.distributed.tied`) and data-parallel
replicas (:mod:`pipesched.runtime.data_parallel`) both send a whole list of
same-dtype tensors as one flat buffer instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def through_host(sources: Sequence[Tensor], collective: Callable[[Tensor], Any],
                 targets: Sequence[Tensor] = ()) -> None:
    """``collective(flat)`` on the concatenation of ``sources`` (same dtype) in host memory, in place;
    then each of ``targets`` (shaped like the sources, in order) gets its part of the result."""
    flat = torch.cat([s.detach().reshape(-1).cpu() for s in sources])
    collective(flat)
    offset = 0
    for target in targets:
        target.copy_(flat[offset: offset + target.numel()].view_as(target))
        offset += target.numel()


__all__ = ["through_host"]
