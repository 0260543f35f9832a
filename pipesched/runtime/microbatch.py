"""Batch ⇄ micro-batches: split along dim 0 into near-equal parts, and gather back.

A batch is a Tensor or a tuple of Tensors that all share their first
dimension. Split sizes differ by at most one (``torch.tensor_split``'s rule), and
a batch with fewer rows than ``chunks`` becomes one row per micro-batch, so no
row is ever dropped and no micro-batch is ever empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from pipesched.runtime.structure import TENSOR, TUPLE, Structure, flatten

Batch = Tensor | tuple[Tensor, ...]


def as_tensors(value: object, name: str) -> tuple[Tensor, ...]:
    """``value`` as a tuple of tensors, or a ``TypeError`` that names ``name``."""
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value:
        for index, item in enumerate(value):
            if not isinstance(item, Tensor):
                raise TypeError(
                    f"{name}[{index}] must be a torch.Tensor, got {type(item).__name__}; "
                    f"{name} must be a Tensor or a tuple of Tensors"
                )
        return tuple(value)
    raise TypeError(f"{name} must be a Tensor or a non-empty tuple of Tensors, got {type(value).__name__}")


def batch_tensors(inputs: object) -> tuple[tuple[Tensor, ...], Structure]:
    """A batch's tensors and the structure a micro-batch of them is handed to stage 0 in: a Tensor, a
    tuple of Tensors, or a mapping of keyword names to batch-first Tensors (a traced model's
    ``forward(**inputs)``), which stays a mapping per micro-batch."""
    if isinstance(inputs, Mapping):
        if not inputs or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in inputs.items()):
            found = {k: type(v).__name__ for k, v in inputs.items()}
            raise TypeError(f"inputs is a {type(inputs).__name__} with {found}; a dict of inputs must map "
                            f"keyword names (str) to batch-first Tensors")
        return flatten(inputs, "inputs")
    tensors = as_tensors(inputs, "inputs")
    return tensors, TENSOR if isinstance(inputs, Tensor) else TUPLE


def batch_size(tensors: Sequence[Tensor], name: str) -> int:
    """The shared first dimension of ``tensors``; refuses scalars, mismatches and empty batches."""
    sizes = []
    for index, tensor in enumerate(tensors):
        if tensor.dim() == 0:
            raise ValueError(
                f"{name}[{index}] is a 0-dim tensor; pipeline inputs need a batch dimension "
                f"(use tensor.unsqueeze(0) for a batch of one)"
            )
        sizes.append(tensor.shape[0])
    if len(set(sizes)) > 1:
        raise ValueError(
            f"the tensors of {name} disagree on batch size (dim 0): {sizes}; "
            f"every tensor must hold the same number of rows"
        )
    if sizes[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 rows); give at least one row")
    return sizes[0]


def split_sizes(rows: int, chunks: int) -> list[int]:
    """Sizes of ``min(chunks, rows)`` micro-batches covering ``rows``, differing by at most one."""
    count = min(chunks, rows)
    return [rows // count + (1 if i < rows % count else 0) for i in range(count)]


def scatter(tensors: Sequence[Tensor], sizes: Sequence[int]) -> list[tuple[Tensor, ...]]:
    """Split every tensor into views of ``sizes`` rows; one tuple per micro-batch."""
    columns = [torch.split(tensor, list(sizes)) for tensor in tensors]
    return [tuple(column[i] for column in columns) for i in range(len(sizes))]


def gather(parts: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Concatenate per-micro-batch tuples back into one batch (a new tensor per position)."""
    return tuple(torch.cat([part[i] for part in parts]) for i in range(len(parts[0])))
