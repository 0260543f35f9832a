"""What every rank shares at the end of a step, and what it means.

A step's point-to-point messages tell a rank only about its own peers, and
a rank that failed stops sending. So every step ends with one all-gather of
a few numbers per rank (a *status*: whether it succeeded, the loss on the
last stage's rank, its memory figures), on the way every step takes: an
error anywhere is raised everywhere, the loss reaches every rank, and every
report holds every rank's memory. Error texts cross only when a rank
failed, and every rank's task records only with ``gather_timeline``.

A schedule built for measured costs (``wants_costs``, e.g. ``"auto"``) needs
every stage's task times, and each process measures only its own stages. So
for such a schedule the status row carries this rank's median F, B and W
seconds per stage (:func:`cost_row`), and every rank merges the gathered rows
into the same table (:func:`merged_costs`): identical bytes on every rank, so
every rank synthesises the identical plan for the next step, with no extra
collective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
    ["ok", "remote", "has_loss", "loss", "loss_dtype", "peak_inflight", "peak_bytes", "held_bytes", "normaliser",
     "summed", "nonfinite"])}


#: The task kinds a cost row holds, in its order: row[k * num_stages + s] is (COST_KINDS[k], s).
COST_KINDS = ("F", "B", "W", "BW")  # BW: a whole backward of a stage measured split too


def status_row(local_error: BaseException | None, memory: RankMemory, loss: Tensor | None,
               costs: Tensor | None = None, normaliser: float | None = None, nonfinite: bool = False) -> Tensor:
    """This rank's status: its outcome, its memory figures, and the batch's loss and loss normaliser
    (``None``: a summed loss) on the last stage's rank.

    ``costs`` (:func:`cost_row`), when the schedule wants measured costs, is
    appended; every rank must then pass one of the same length.
    """
    mine = torch.zeros(len(_STATUS), dtype=torch.float64)
    mine[_STATUS["ok"]] = local_error is None
    mine[_STATUS["remote"]] = isinstance(local_error, RemoteStepError)
    mine[_STATUS["peak_inflight"]] = memory.peak_inflight
    mine[_STATUS["peak_bytes"]] = memory.peak_bytes
    mine[_STATUS["held_bytes"]] = memory.held_bytes
    mine[_STATUS["nonfinite"]] = nonfinite  # a gradient of this rank is inf or NaN (loss scaling)
    if loss is not None:
        mine[_STATUS["has_loss"]] = 1
        mine[_STATUS["loss"]] = loss.item()
        mine[_STATUS["loss_dtype"]] = DTYPES.index(loss.dtype)
        mine[_STATUS["summed"]] = normaliser is None
        mine[_STATUS["normaliser"]] = 0.0 if normaliser is None else normaliser
    return mine if costs is None else torch.cat([mine, costs])


def cost_row(costs: Mapping[tuple[str, int], float], num_stages: int) -> Tensor:
    """This rank's measured ``{(kind, stage): seconds}`` as a row; NaN where it measured nothing."""
    row = torch.full((len(COST_KINDS) * num_stages,), math.nan, dtype=torch.float64)
    for (kind, stage), seconds in costs.items():
        row[COST_KINDS.index(kind) * num_stages + stage] = seconds
    return row


def merged_costs(statuses: Sequence[Mapping[str, Any]], placement: Sequence[int]) -> dict[tuple[str, int], float]:
    """Every stage's costs, each read from the row of the rank that owns the stage (it ran its tasks).

    The same table on every rank: built from the same gathered rows in the
    same order. A (kind, stage) its owner did not measure is left out (an
    unsplit backward has no W), as :func:`~pipesched.plan.costs.median_costs` does.
    """
    num_stages = len(placement)
    table: dict[tuple[str, int], float] = {}
    for k, kind in enumerate(COST_KINDS):
        for stage, rank in enumerate(placement):
            seconds = statuses[rank]["costs"][k * num_stages + stage]
            if not math.isnan(seconds):
                table[(kind, stage)] = seconds
    return table


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
        "held_bytes": int(get["held_bytes"]), "costs": values[len(_STATUS):],
        "normaliser": None if get["summed"] else get["normaliser"], "nonfinite": bool(get["nonfinite"]),
    }
