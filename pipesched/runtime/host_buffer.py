"""Many tensors through one gloo collective: flatten into a host buffer, run it, copy the result back.

Gloo works on host tensors, and one message per tensor costs a round trip
each: tied weights (:mod:`pipesched.distributed.tied`) and data-parallel
replicas (:mod:`pipesched.runtime.data_parallel`) both send a whole list of
same-dtype tensors as one flat buffer instead.

A flat dense buffer cannot carry a sparse gradient (``nn.Embedding(sparse=True)``):
:func:`refuse_sparse_gradients` names such a parameter when the pipeline is
built, rather than letting torch's "reshape is not implemented for sparse
tensors" surface at the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


@torch.no_grad()
def through_host(sources: Sequence[Tensor], collective: Callable[[Tensor], Any],
                 targets: Sequence[Tensor] = ()) -> None:
    """``collective(flat)`` on the concatenation of ``sources`` (same dtype) in host memory, in place;
    then each of ``targets`` (shaped like the sources, in order) gets its part of the result."""
    if any(s.is_sparse for s in sources):
        raise TypeError("a sparse tensor cannot cross processes through a flat host buffer; build layers "
                        "with sparse=False (e.g. nn.Embedding(..., sparse=False))")
    flat = torch.cat([s.detach().reshape(-1).cpu() for s in sources])
    collective(flat)
    offset = 0
    for target in targets:
        target.copy_(flat[offset: offset + target.numel()].view_as(target))
        offset += target.numel()


def refuse_sparse_gradients(modules: Iterable[nn.Module], what: str, only: set[int] | None = None) -> None:
    """Raise ``ValueError`` naming the first parameter of ``modules`` (of those in ``only``, by id)
    whose layer makes sparse gradients: ``what`` (the exchange, e.g. ``data_parallel_group``) sends
    gradients as one flat dense buffer. Layers are named as in their module (a stage keeps the
    model's layer names)."""
    for module in modules:
        for layer_name, layer in module.named_modules():
            if not getattr(layer, "sparse", False) or not isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
                continue
            for name, param in layer.named_parameters(recurse=False):
                if only is None or id(param) in only:
                    full = f"{layer_name}.{name}" if layer_name else name
                    raise ValueError(
                        f"parameter {full!r} gets sparse gradients ({type(layer).__name__}(sparse=True)), "
                        f"which {what} cannot exchange (gradients cross processes as one dense buffer); "
                        f"build the layer with sparse=False"
                    )


__all__ = ["refuse_sparse_gradients", "through_host"]
