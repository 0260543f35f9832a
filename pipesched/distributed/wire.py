"""What crosses the network between pipeline processes: a spec once, then one packed buffer.

A receiver cannot allocate a buffer before it knows the shape. Shapes are
the same step after step for the same micro-batch shape, so they cross
once (a *spec*), and afterwards each message is a single buffer the
receiver can post in advance, sized from the spec it keeps:

* **spec** (a header of :data:`HEADER_SLOTS` int64s, :func:`encode` /
  :func:`decode`): how many tensors, their dtypes and shapes, how they fit
  together (a bare Tensor, a tuple, or a mapping, see
  :mod:`pipesched.runtime.structure`; a mapping's keys and type name, and
  the places of a tuple's or mapping's ``None`` entries, which send no bytes,
  follow as one more part, UTF-8 JSON whose length the header gives), or that the
  message is an *error*: the producing rank failed, and a UTF-8
  description follows instead of tensors.
* **payload** (:func:`pack` / :func:`unpack`): a 16-byte status prefix,
  then every tensor's bytes, each padded to 16 bytes, in one uint8 buffer:
  one send and one receive per message, however many tensors it carries.
  The status says ``OK``; ``ERROR`` (the producer failed; a description of
  the prefix's length follows); or ``RESPEC`` (the values do not match the
  spec both sides kept: a new spec and payload follow).

Tags keep messages apart on backends that match by tag (gloo): each message
of a step has its own, derived from the step number (64 steps apart, each
with its own range whatever its plan) and the message's index in the plan's
lowering, one per part (:data:`PARTS`), so a stale message of an aborted
step can never be taken for one of the next, and two messages from one
action (a skip connection beside an activation) never share one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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

#: The parts of one message, each its own tag.
HEADER, DESCRIPTION, PAYLOAD, ERROR_TEXT, RESPEC_PAYLOAD = range(5)
PARTS = 5
_STEPS_APART = 64


#: Messages one step may hold: every step has its own range of tags, whatever its plan.
_STEP_STRIDE = (2**31 // _STEPS_APART) // PARTS


def message_tag(step: int, index: int, part: int) -> int:
    """The tag of ``part`` of message ``index`` (its transfer's position in the step's lowering)."""
    if index >= _STEP_STRIDE:
        raise ValueError(
            f"too many messages per step for the tag space (message {index}, at most {_STEP_STRIDE}); "
            f"use fewer micro-batches or stages"
        )
    return ((step % _STEPS_APART) * _STEP_STRIDE + index) * PARTS + part


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

    def spec(self, description: Tensor | None = None) -> Spec:
        """The spec this header announces (a mapping's structure from its received ``description``)."""
        return self.specs, self.structure(description)

    def structure(self, description: Tensor | None = None) -> Structure:
        """The structure of the tensors; a mapping's comes from its received ``description``."""
        if description is None:
            return TENSOR if self.kind == "tensor" else TUPLE
        fields = json.loads(bytes(description.tolist()).decode("utf-8"))
        absent = tuple(fields.get("absent", ()))
        if self.kind != "mapping":
            return Structure(self.kind, absent=absent)  # a tuple with None entries
        return Structure("mapping", tuple(fields["keys"]), mapping_type_named(fields["type"]), absent)


def encode(values: tuple[Tensor | None, ...], structure: Structure) -> tuple[Tensor, Tensor | None]:
    """The header announcing ``values`` (``None`` entries are absent gradients), and for a
    mapping, or a structure with ``None`` entries, the description (UTF-8 JSON of its keys, type
    name and absent places) sent after the tensors."""
    if len(values) > MAX_TENSORS:
        raise ValueError(f"a stage boundary carries {len(values)} tensors; at most {MAX_TENSORS} are supported")
    header = torch.zeros(HEADER_SLOTS, dtype=torch.int64)
    header[0], header[1], header[2] = OK, _KINDS.index(structure.kind), len(values)
    description = None
    if structure.kind == "mapping" or structure.absent:
        text = json.dumps({"keys": list(structure.keys), "type": structure.type_name,
                           "absent": list(structure.absent)})
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


# ------------------------------------------------------------------ payloads

#: Status codes in a payload's prefix.
RESPEC = 2
PREFIX_BYTES = 16
_ALIGN = 16

Spec = tuple[tuple[tuple[torch.dtype, tuple[int, ...]] | None, ...], Structure]  # tensor specs, structure


def spec_of(values: tuple[Tensor | None, ...], structure: Structure) -> Spec:
    """What a receiver needs to post the payload of ``values``: dtypes and shapes, and their structure."""
    return tuple(None if v is None else (v.dtype, tuple(v.shape)) for v in values), structure


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def payload_bytes(spec: Spec) -> int:
    """The size of a payload holding tensors of ``spec``, prefix included."""
    total = PREFIX_BYTES
    for entry in spec[0]:
        if entry is not None:
            dtype, shape = entry
            total += _padded(_numel(shape) * _itemsize(dtype))
    return total


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def status_payload(spec: Spec, status: int, aux: int = 0) -> Tensor:
    """A payload of ``spec``'s size carrying only a status (an error, or a re-spec) and ``aux``."""
    buffer = torch.empty(payload_bytes(spec), dtype=torch.uint8)
    buffer[:PREFIX_BYTES].view(torch.int64).copy_(torch.tensor([status, aux], dtype=torch.int64))
    return buffer


def pack(values: tuple[Tensor | None, ...], spec: Spec, device: torch.device | str = "cpu") -> Tensor:
    """``values`` (contiguous tensors on ``device`` matching ``spec``) as one payload with status ``OK``."""
    buffer = torch.empty(payload_bytes(spec), dtype=torch.uint8, device=device)
    buffer[:PREFIX_BYTES].view(torch.int64).zero_()
    at = PREFIX_BYTES
    for value in values:
        if value is None:
            continue
        nbytes = value.numel() * value.element_size()
        if nbytes:
            buffer[at:at + nbytes].copy_(value.reshape(-1).view(torch.uint8))
        at += _padded(nbytes)
    return buffer


def status_of(buffer: Tensor) -> tuple[int, int]:
    """A received payload's status and its auxiliary number (an error description's length)."""
    status, aux = buffer[:PREFIX_BYTES].view(torch.int64).tolist()
    return status, aux


def unpack(buffer: Tensor, spec: Spec) -> tuple[Tensor | None, ...]:
    """The tensors of a received payload: views of ``buffer`` (nothing is copied)."""
    values: list[Tensor | None] = []
    at = PREFIX_BYTES
    for entry in spec[0]:
        if entry is None:
            values.append(None)
            continue
        dtype, shape = entry
        nbytes = _numel(shape) * _itemsize(dtype)
        values.append(buffer[at:at + nbytes].view(dtype).view(shape))
        at += _padded(nbytes)
    return tuple(values)
