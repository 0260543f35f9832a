"""What crosses the network between pipeline processes: a fixed-size header, then tensors.

A receiver cannot allocate a buffer before it knows the shape, and shapes
change per micro-batch (uneven splits, variable sequence lengths). So every
message starts with a header of fixed size (:data:`HEADER_SLOTS` int64s) that
the receiver can always post in advance; it says how many tensors follow and
their dtypes and shapes, or that the message is an *error*: the producing
rank failed, and a UTF-8 description follows instead of tensors.

The header also says how the tensors fit together (a bare Tensor, a tuple, or
a mapping, see :mod:`pipesched.runtime.structure`). A mapping's keys and type name
follow the tensors as one more part, UTF-8 JSON whose length the header gives.

Tags keep messages apart on backends that match by tag (gloo): each message
of a step has its own, derived from the step number and the (kind, stage,
micro-batch) of the action that produced it, so a stale message of an
aborted step can never be taken for one of the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import json

import torch
from torch import Tensor

from pipesched.runtime.structure import TENSOR, TUPLE, Structure, mapping_type_named

HEADER_SLOTS = 256
MAX_DIMS = 8
_FIXED = 4  # status, structure kind, count, length of the error or mapping description
_PER_TENSOR = 3 + MAX_DIMS  # present, dtype, ndim, dims
MAX_TENSORS = (HEADER_SLOTS - _FIXED) // _PER_TENSOR

OK, ERROR = 0, 1
DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.complex64, torch.complex128,
]
_CODE = {dtype: code for code, dtype in enumerate(DTYPES)}
_KINDS = ("tuple", "tensor", "mapping")  # codes on the wire: 0, 1 (as the old 'single' flag), 2

#: How many tags one step may use: per message a header, up to MAX_TENSORS tensors, a description.
_PARTS = 2 + MAX_TENSORS
_STEPS_APART = 64


def message_tag(step: int, kind: str, stage: int, microbatch: int, num_stages: int,
                num_microbatches: int, part: int = 0, num_skips: int = 0) -> int:
    """The tag of ``part`` (0 = header, 1.. = tensors, then a mapping's description).

    Kinds ``"F"`` and ``"B"`` name a stage's output and input gradient;
    ``"S"`` and ``"T"`` a skip connection's tensors and their gradients, with
    ``stage`` the skip edge's index (of ``num_skips``).
    """
    if kind in ("S", "T"):
        channel = 2 * num_stages + (0 if kind == "S" else num_skips) + stage
    else:
        channel = (0 if kind == "F" else 1) * num_stages + stage
    index = channel * num_microbatches + microbatch
    per_step = (2 * num_stages + 2 * num_skips) * num_microbatches
    tag = ((step % _STEPS_APART) * per_step + index) * _PARTS + part
    if tag >= 2**31:
        raise ValueError(
            f"too many messages per step for the tag space ({num_stages} stages x "
            f"{num_microbatches} micro-batches); use fewer micro-batches or stages"
        )
    return tag


@dataclass(frozen=True)
class Header:
    status: int
    kind: str  # a Structure kind
    specs: tuple[tuple[torch.dtype, tuple[int, ...]] | None, ...]  # None: an absent gradient
    error_length: int = 0
    description_length: int = 0  # bytes of a mapping's description, sent after the tensors

    def allocate(self, device: torch.device) -> list[Tensor | None]:
        """Empty receive buffers for the tensors this header announces."""
        return [None if spec is None else torch.empty(spec[1], dtype=spec[0], device=device)
                for spec in self.specs]

    @property
    def description_part(self) -> int:
        """The message part (tag offset) that carries a mapping's description."""
        return len(self.specs) + 1

    def structure(self, description: Tensor | None = None) -> Structure:
        """The structure of the tensors; a mapping's comes from its received ``description``."""
        if self.kind != "mapping":
            return TENSOR if self.kind == "tensor" else TUPLE
        assert description is not None
        fields = json.loads(bytes(description.tolist()).decode("utf-8"))
        return Structure("mapping", tuple(fields["keys"]), mapping_type_named(fields["type"]))


def encode(values: tuple[Tensor | None, ...], structure: Structure) -> tuple[Tensor, Tensor | None]:
    """The header announcing ``values`` (``None`` entries are absent gradients), and for a
    mapping the description (UTF-8 JSON of its keys and type name) sent after the tensors."""
    if len(values) > MAX_TENSORS:
        raise ValueError(f"a stage boundary carries {len(values)} tensors; at most {MAX_TENSORS} are supported")
    header = torch.zeros(HEADER_SLOTS, dtype=torch.int64)
    header[0], header[1], header[2] = OK, _KINDS.index(structure.kind), len(values)
    description = None
    if structure.kind == "mapping":
        text = json.dumps({"keys": list(structure.keys), "type": structure.type_name})
        description = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()
        header[3] = description.numel()
    for i, value in enumerate(values):
        at = _FIXED + i * _PER_TENSOR
        if value is None:
            continue
        if value.dtype not in _CODE:
            raise TypeError(f"cannot send tensors of dtype {value.dtype} between processes")
        if value.dim() > MAX_DIMS:
            raise ValueError(f"cannot send a {value.dim()}-D tensor; at most {MAX_DIMS} dimensions")
        header[at], header[at + 1], header[at + 2] = 1, _CODE[value.dtype], value.dim()
        header[at + 3 : at + 3 + value.dim()] = torch.tensor(value.shape, dtype=torch.int64)
    return header, description


def encode_error(message: str) -> tuple[Tensor, Tensor]:
    """An error header and the UTF-8 bytes of ``message`` that follow it."""
    data = torch.frombuffer(bytearray(message.encode("utf-8") or b" "), dtype=torch.uint8).clone()
    header = torch.zeros(HEADER_SLOTS, dtype=torch.int64)
    header[0], header[3] = ERROR, data.numel()
    return header, data


def decode(header: Tensor) -> Header:
    values = header.tolist()
    if values[0] == ERROR:
        return Header(ERROR, "tuple", (), error_length=values[3])
    specs: list[tuple[torch.dtype, tuple[int, ...]] | None] = []
    for i in range(values[2]):
        at = _FIXED + i * _PER_TENSOR
        if not values[at]:
            specs.append(None)
            continue
        ndim = values[at + 2]
        specs.append((DTYPES[values[at + 1]], tuple(values[at + 3 : at + 3 + ndim])))
    return Header(OK, _KINDS[values[1]], tuple(specs), description_length=values[3])
