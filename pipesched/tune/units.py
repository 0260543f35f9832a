"""A model that is not an ``nn.Sequential``, as the layers ``tune`` profiles: one unit per block.

``tune`` times layers one at a time and balances them into stages. For a
traced model the layers are the blocks of its block list (the longest
``nn.ModuleList`` of one class), exactly what ``balance=`` counts for such a
model in :class:`~pipesched.Pipeline`: the model is cut before every block
(:class:`~pipesched.runtime.any_model.ModelCut`, guarded like a pipeline's
cut), so the embeddings ride with the first unit and the final norm and head
with the last, and a tuned ``balance`` is a valid ``Pipeline(model, balance=...)``.

The profiler passes a tuple of tensors from layer to layer; a cut stage takes
a mapping (the first) or a tuple that may hold ``None`` entries, so each unit
speaks the profiler's form: the first takes the keyword tensors in the
trace's key order, and every ``None`` a stage outputs (their places are fixed
by the trace, learnt from one run) is left out and put back for the next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipesched.runtime.any_model import ModelCut, block_list, split_points_from_balance

__all__ = ["block_units"]


class BlockUnit(nn.Module):
    """One block of a cut model (its stage of a cut before every block), tuple of tensors in and out."""

    def __init__(self, stage: nn.Module, keys: Sequence[str] | None, holes_in: Sequence[int],
                 holes_out: Sequence[int]):
        super().__init__()
        self.stage = stage
        self.keys = tuple(keys) if keys is not None else None
        self.holes_in = frozenset(holes_in)
        self.holes_out = frozenset(holes_out)

    def forward(self, tensors: Any) -> Any:
        tensors = (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)
        if self.keys is not None:
            value: Any = dict(zip(self.keys, tensors, strict=True))
        else:
            given = iter(tensors)
            value = tuple(None if i in self.holes_in else next(given)
                          for i in range(len(tensors) + len(self.holes_in)))
        out = self.stage(value)
        if isinstance(out, tuple):
            return tuple(v for i, v in enumerate(out) if i not in self.holes_out)
        return out  # the last unit: the model's own output (logits, a ModelOutput)


def _holes(value: Any) -> list[int]:
    return [i for i, v in enumerate(value) if v is None] if isinstance(value, tuple) else []


def block_units(module: nn.Module, inputs: object) -> tuple[nn.Sequential, tuple[Tensor, ...]]:
    """``module`` cut before every block, as an ``nn.Sequential`` of :class:`BlockUnit`, and ``inputs`` as a tuple.

    ``inputs`` is the batch a pipeline will get: a dict of batch-first keyword
    tensors. Its first two rows trace and probe the cut (the user's model is
    not modified).
    """
    if not isinstance(inputs, Mapping) or not inputs or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in inputs.items()):
        raise TypeError(
            f"{type(module).__name__} is not an nn.Sequential, so it is traced and cut like Pipeline(model) "
            f"cuts it; inputs must be a dict of its keyword tensors (e.g. {{'input_ids': ids, "
            f"'attention_mask': mask}}), got {type(inputs).__name__}"
        )
    name, blocks = block_list(module)
    example = {k: v[:2] for k, v in inputs.items()}
    cut = ModelCut(module, split_points_from_balance(name, [1] * len(blocks)), example, None)
    holes = []
    with torch.no_grad():
        value: Any = example
        for stage in cut.stages:
            value = stage(value)
            holes.append(_holes(value))
    units = [BlockUnit(stage, cut.keys if index == 0 else None, holes[index - 1] if index else [], holes[index])
             for index, stage in enumerate(cut.stages)]
    return nn.Sequential(*units), tuple(inputs[k] for k in cut.keys)
