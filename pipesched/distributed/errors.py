"""How a failure on one rank is raised on the others.

A rank that fails tells its peers in words (:func:`describe`): the text
travels in place of the messages it still owes
(:mod:`pipesched.distributed.comm`) and in the end-of-step status exchange
(:mod:`pipesched.distributed.outcome`). Every rank that did not see the
failure happen raises :class:`RemoteStepError` with that text; a rank that
died or stopped answering is named by :class:`PeerLost`, whose mark survives
the trip as text (:func:`remote_error`), so a rank that learns of it
second-hand stops for good too. These types are the multi-process backend's
public errors (``from pipesched.distributed import PeerLost,
RemoteStepError``), kept apart from the machinery that raises them;
``RemoteStepError`` itself is defined in :mod:`pipesched.runtime.remote_error`,
because data parallelism raises it for the single-process pipeline too.
"""

from __future__ import annotations

import traceback

from pipesched.runtime.remote_error import RemoteStepError


class PeerLost(RemoteStepError):
    """A rank of the pipeline died or stopped answering during this step; the message names it.

    Messages of the step may be lost or still in flight, so the pipeline (and
    the process group) cannot be used again: restart the job.
    """

    MARK = "lost rank "  # every message starts with it, so it survives travelling as an error


def lost(peer: int, why: str) -> PeerLost:
    return PeerLost(f"{PeerLost.MARK}{peer}: {why}")


def remote_error(text: str) -> RemoteStepError:
    """The error a received error description stands for."""
    return (PeerLost if text.startswith(PeerLost.MARK) else RemoteStepError)(text)


def describe(error: BaseException, rank: int) -> str:
    """One line naming where and what failed, for the ranks that did not see it happen."""
    if isinstance(error, RemoteStepError):
        return str(error)
    notes = [n.removeprefix("pipesched: ") for n in getattr(error, "__notes__", [])]
    where = notes[0] if notes else f"raised on rank {rank}"
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}, {where}{at}"


__all__ = ["PeerLost", "RemoteStepError", "describe", "lost", "remote_error"]
