"""Data-parallel collectives that give up on a lost process after ``stall_timeout``, not the group's timeout.

The pipeline's own traffic already promises that a process that dies or
stops answering surfaces everywhere within about ``stall_timeout``
(:mod:`pipesched.distributed.comm`). Under a mesh, the replicas also meet in
collectives over ``mesh["dp"]``: FSDP2's all-gather at the start of a step,
the end-of-step exchange and FSDP's reduce-scatter. Those wait as long as
their process group says (gloo: 30 minutes by default), so a replica whose
partner lost a pipeline peer, and therefore never came to the exchange,
would sit there for half an hour.

So the data parallelism runs over a group of its own: the same processes as
``mesh["dp"]``, created with ``timeout=stall_timeout`` (torch's public
``new_group``, synchronised only among its members), wrapped as a one-dimensional
``DeviceMesh`` (``DeviceMesh.from_group``) for ``fully_shard`` / ``replicate``.
Every wait in it then ends within ``stall_timeout`` with a ``RuntimeError``,
which the step turns into :class:`~pipesched.distributed.errors.PeerLost`.
The user's mesh and its groups are left as they were.

The price: replicas must enter each step within ``stall_timeout`` of each
other (the step's first collective is FSDP's all-gather over the replicas),
so work that one replica alone does between steps (saving a checkpoint on
one process, say) must fit in ``stall_timeout`` too, as it must under NCCL's
own 10-minute watchdog. ``stall_timeout=None`` keeps ``mesh["dp"]`` itself.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def bounded_dp_mesh(dp_mesh: DeviceMesh, stall_timeout: float | None) -> DeviceMesh:
    """A one-dimensional mesh over ``dp_mesh``'s processes whose collectives time out after ``stall_timeout``.

    Collective over ``dp_mesh``'s members only (``use_local_synchronization``):
    each data-parallel group is created by its own processes, in any order.
    """
    if stall_timeout is None:
        return dp_mesh
    ranks = dist.get_process_group_ranks(dp_mesh.get_group())
    group = dist.new_group(ranks, timeout=timedelta(seconds=stall_timeout), use_local_synchronization=True)
    return DeviceMesh.from_group(group, dp_mesh.device_type, mesh_dim_names=("dp",))


__all__ = ["bounded_dp_mesh"]
