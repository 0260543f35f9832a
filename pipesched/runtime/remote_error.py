"""The error of a step that failed in another process.

Both pipelines can be joined to other processes: a ``DistributedPipeline``'s
ranks, and replicas of either pipeline under data parallelism
(:mod:`pipesched.runtime.data_parallel`). A process that did not see the
failure happen raises this, with the failing process's own description. It
lives here, below both pipelines, so that both raise the one class users
catch (``from pipesched.distributed import RemoteStepError``).
"""

from __future__ import annotations


class RemoteStepError(RuntimeError):
    """Another rank of the pipeline failed during this step; the message says where and why."""


__all__ = ["RemoteStepError"]
