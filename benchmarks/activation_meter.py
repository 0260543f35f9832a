"""An independent count of one stage's activation bytes for one micro-batch.

The definition is docs/guide/pipeline.md's: the stage input plus the distinct tensors
autograd saves for backward (seen through ``saved_tensors_hooks``), other than
the stage's parameters and buffers. Measured here on the bare stage module,
outside the engine, so the memory benchmark's theory (per-stage bytes × what
the plan keeps in flight) does not lean on the engine's own accounting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class StageBytes:
    input: int  # the stage input (what a checkpointed forward keeps)
    total: int  # input + saved tensors (what a kept forward holds)

    @property
    def recompute(self) -> int:
        """What a checkpointed stage's recompute adds during its backward."""
        return self.total - self.input


def _key(t: Tensor) -> tuple[int, int, int, torch.dtype]:
    return (t.data_ptr(), t.storage_offset(), t.numel(), t.dtype)


def stage_bytes(
    module: nn.Module,
    x: Tensor,
    input_requires_grad: bool,
    loss: Callable[[Tensor], Tensor] | None = None,
) -> tuple[StageBytes, Tensor]:
    """Bytes one micro-batch ``x`` keeps in ``module``; also returns the output (detached).

    ``loss`` (on the last stage) is applied to the output inside the count, as
    the engine computes the loss inside the last stage's forward.
    """
    exclude = {t.data_ptr() for t in (*module.parameters(), *module.buffers())}
    leaf = x.detach().requires_grad_(input_requires_grad)
    seen: dict[tuple[int, int, int, torch.dtype], int] = {_key(leaf): leaf.numel() * leaf.element_size()}

    def pack(t: Tensor) -> Tensor:
        if t.layout == torch.strided and t.data_ptr() not in exclude:
            seen.setdefault(_key(t), t.numel() * t.element_size())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(leaf)
        if loss is not None:
            loss(out)
    return StageBytes(input=leaf.numel() * leaf.element_size(), total=sum(seen.values())), out.detach()


def plan_peak(row: list, units: dict[int, StageBytes], checkpointed: bool) -> int:
    """Theory for one rank: walk its actions in plan order, adding what each forward keeps.

    Kept forwards hold ``total``; checkpointed ones hold ``input`` and, during
    their backward, the recompute's bytes on top.
    """
    held = peak = 0
    for action in row:
        unit = units[action.stage]
        if action.kind == "F":
            held += unit.input if checkpointed else unit.total
            peak = max(peak, held)
        else:
            if checkpointed:
                peak = max(peak, held + unit.recompute)
            held -= unit.input if checkpointed else unit.total
    return peak
