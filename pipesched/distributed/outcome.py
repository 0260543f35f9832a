"""What every rank shares at the end of a step, and what it means.

A step's point-to-point messages tell a rank only about its own peers, and
a rank that failed stops sending. So every step ends with one all-gather of
a few numbers per rank (a *status*: whether it succeeded, the loss on the
last stage's rank, its memory figures), on the way every step takes: an
error anywhere is raised everywhere, the loss reaches every rank, and every
report holds every rank's memory. Error texts cross only when a rank
failed, and every rank's task records only with ``gather_timeline``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipesched.distributed.errors import RemoteStepError
from pipesched.distributed.wire import DTYPES
from pipesched.runtime.checkpoint import RankMemory

#: What each rank shares at the end of a step: one float64 each (a loss of any float dtype
#: up to float64 and byte counts below 2**53 cross exactly).
_STATUS = {name: i for i, name in enumerate(
    ["ok", "remote", "has_loss", "loss", "loss_dtype", "peak_inflight", "peak_bytes", "held_bytes"])}


def status_row(local_error: BaseException | None, memory: RankMemory, loss: Tensor | None) -> Tensor:
    """This rank's status: its outcome, its memory figures, and the batch's loss (last stage's rank)."""
    mine = torch.zeros(len(_STATUS), dtype=torch.float64)
    mine[_STATUS["ok"]] = local_error is None
    mine[_STATUS["remote"]] = isinstance(local_error, RemoteStepError)
    mine[_STATUS["peak_inflight"]] = memory.peak_inflight
    mine[_STATUS["peak_bytes"]] = memory.peak_bytes
    mine[_STATUS["held_bytes"]] = memory.held_bytes
    if loss is not None:
        mine[_STATUS["has_loss"]] = 1
        mine[_STATUS["loss"]] = loss.item()
        mine[_STATUS["loss_dtype"]] = DTYPES.index(loss.dtype)
    return mine


def exchange_statuses(mine: Tensor, error: str | None, tasks: list[Any] | None, world: int,
                      group: Any) -> list[dict[str, Any]]:
    """Every rank's status, in rank order.

    One all-gather of the status rows; when any rank failed, a second one of
    the error descriptions (``error``: this rank's, ``None`` if it did not
    fail); otherwise, when ``tasks`` is given (``gather_timeline``), one of
    every rank's task records. A rank that is gone raises gloo's
    ``RuntimeError``.
    """
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    statuses = [_status(row) for row in gathered]
    if not all(s["ok"] for s in statuses):
        errors: list[Any] = [None] * world
        dist.all_gather_object(errors, error, group=group)
        for status, text in zip(statuses, errors):
            status["error"] = text
    elif tasks is not None:
        every: list[Any] = [None] * world
        dist.all_gather_object(every, tasks, group=group)
        for status, own in zip(statuses, every):
            status["tasks"] = own
    return statuses


def failure(statuses: list[Any]) -> str:
    """What a rank that did not fail itself raises: the failing rank's own description, or every one."""
    origin = next((s for s in statuses if not s["ok"] and not s["remote"]), None)
    return origin["error"] if origin else statuses_error(statuses)


def statuses_error(statuses: list[Any]) -> str:
    return "; ".join(s["error"] for s in statuses if s.get("error")) or "a rank failed"


def _status(row: Tensor) -> dict[str, Any]:
    values = row.tolist()
    get = {name: values[i] for name, i in _STATUS.items()}
    return {
        "ok": bool(get["ok"]), "remote": bool(get["remote"]), "error": None,
        "loss": (get["loss"], DTYPES[int(get["loss_dtype"])]) if get["has_loss"] else None,
        "peak_inflight": int(get["peak_inflight"]), "peak_bytes": int(get["peak_bytes"]),
        "held_bytes": int(get["held_bytes"]),
    }
