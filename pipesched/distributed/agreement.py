"""What the ranks must agree on before any message flows: their options once, the batch every step.

Every rank derives the messages it sends and expects from its own plan
(:mod:`pipesched.distributed.comm`). Ranks built with different options
(``chunks=2`` here, ``chunks=4`` there; another schedule, balance or
checkpoint policy) would derive different message patterns, and the first
step would only fail after ``stall_timeout`` with misleading errors (a lost
peer on one rank, a shape mismatch on another), leaving the pipeline
unusable. So the constructor gathers every rank's options once
(:func:`agree_on_options`, one ``all_gather_object``) and raises on every
rank an error naming each option that differs and every rank's value. A
rank whose own arguments were refused takes part too, sending its error,
so no rank is left waiting in a collective for it.

Each step then begins with :func:`agree_on_batch`: stage 0's rank
announces the batch size and a checksum of the inputs' shapes, so every rank
builds the same plan and micro-batch split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipesched.distributed.errors import PeerLost
from pipesched.distributed.inbound import shape_checksum
from pipesched.runtime.microbatch import batch_size, batch_tensors
from pipesched.runtime.remote_error import RemoteStepError
from pipesched.runtime.structure import TUPLE, Structure


def policy_name(checkpoint: Any) -> str:
    """A checkpoint policy as the ranks can compare it: its name, or a function's qualified name."""
    if isinstance(checkpoint, str):
        return checkpoint
    return getattr(checkpoint, "__qualname__", type(checkpoint).__name__)


def agree_on_options(values: dict[str, Any] | None, error: BaseException | None, rank: int, num_ranks: int,
                     group: Any) -> None:
    """Raise on every rank unless every rank built its pipeline with the same ``values``.

    ``values``: this rank's options (name -> a comparable value), or
    ``None`` with ``error``, the refusal of this rank's own arguments
    (raised here, after the exchange; the other ranks raise a
    :class:`RemoteStepError` naming it).
    """
    mine = ("error", f"{type(error).__name__}: {error}") if error is not None else ("options", values)
    every: list[Any] = [None] * num_ranks
    dist.all_gather_object(every, mine, group=group)
    if error is not None:
        raise error
    refused = [(r, text) for r, (kind, text) in enumerate(every) if kind == "error"]
    if refused:
        raise RemoteStepError("; ".join(f"rank {r} could not build its DistributedPipeline: {text}"
                                        for r, text in refused))
    assert values is not None  # no rank refused: every rank sent its options
    differ = [name for name in values if any(other[1].get(name) != values[name] for other in every)]
    if differ:
        raise ValueError("; ".join(
            f"ranks were built with different {name}: "
            + ", ".join(f"rank {r}: {other[1].get(name)!r}" for r, other in enumerate(every))
            for name in differ
        ) + "; build every rank's DistributedPipeline with the same arguments (every rank derives the "
            "messages it exchanges from them)")


def agree_on_batch(inputs: Any, local_error: BaseException | None, *, first: int, rank: int, group: Any,
                   source: int, lose: Callable[[PeerLost], PeerLost], check: Callable[[Any], None] | None = None
                   ) -> tuple[tuple[Tensor, ...], Structure, int, int, BaseException | None]:
    """Every rank learns the batch's rows and shape checksum from stage 0's rank (``first``, global
    rank ``source``); returns stage 0's tensors (empty elsewhere) and their structure (a tuple, a
    Tensor, or a mapping of keyword tensors), the rows, the checksum, and ``local_error`` unchanged
    or set by stage 0's refusal of the inputs. ``check(inputs)`` runs on stage 0's rank first (a
    traced model's check of keys, dtypes and sizes); what it raises is a refusal too.

    One broadcast of three integers (status, rows, a checksum of the
    inputs' dtypes and trailing shapes that keys the message specs); a
    refusal follows as a second broadcast carrying its text. A failed
    collective means a rank is gone: ``lose`` marks the pipeline unusable.
    """
    announced = torch.zeros(3, dtype=torch.int64)  # status (0 ok, 1 refused), rows, shape checksum
    tensors: tuple[Tensor, ...] = ()
    structure = TUPLE
    refusal = ""
    if rank == first:
        try:
            if check is not None:
                check(inputs)
            tensors, structure = batch_tensors(inputs)
            announced[1] = batch_size(tensors, "inputs")
            announced[2] = shape_checksum(tensors)
        except (TypeError, ValueError, RuntimeError) as error:
            local_error = error
            announced[0] = 1
            refusal = f"{type(error).__name__}: {error}"
    try:
        dist.broadcast(announced, src=source, group=group)
        if announced[0]:
            message: list[Any] = [refusal]
            dist.broadcast_object_list(message, src=source, group=group)
    except RuntimeError as error:  # a rank died between steps: the group is broken
        raise lose(PeerLost(f"a rank is gone (start-of-step exchange failed: {error})")) from error
    if announced[0]:
        if rank == first:
            raise local_error  # type: ignore[misc]
        raise RemoteStepError(f"rank {first} (stage 0) refused the inputs: {message[0]}")
    return tensors, structure, int(announced[1]), int(announced[2]), local_error


__all__ = ["agree_on_batch", "agree_on_options", "policy_name"]
