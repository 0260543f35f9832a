"""2 gloo processes: a 1F1B step whose every message crosses through ``batch_isend_irecv``
(``tests/test_staging.py``): the path NCCL takes, with only the backend different."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from world_process import run_in_world

from pipesched.distributed import DistributedPipeline


def entry(rank: int, world: int, port: int, names: list[str], directory: str) -> None:
    run_in_world(rank, world, port, directory, _count_one_step)


def _count_one_step(out: dict) -> None:
    """One exact 1F1B step; how many sends and receives were posted in and outside a batch."""
    calls = {"batched": 0, "outside": 0}
    real_batch, real_isend, real_irecv = dist.batch_isend_irecv, dist.isend, dist.irecv
    inside = [False]

    def batch(ops):
        calls["batched"] += 1
        inside[0] = True
        try:
            return real_batch(ops)
        finally:
            inside[0] = False

    def counted(real):
        def call(*args, **kwargs):
            if not inside[0]:
                calls["outside"] += 1
            return real(*args, **kwargs)
        return call

    # a send or receive posted outside a batch is counted; P2POp checks its op against the module's
    # own isend/irecv, so both names are swapped
    from torch.distributed import distributed_c10d as c10d

    isend, irecv = counted(real_isend), counted(real_irecv)
    dist.batch_isend_irecv, dist.isend, dist.irecv, c10d.isend, c10d.irecv = batch, isend, irecv, isend, irecv
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        reference = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        reference.load_state_dict(model.state_dict())
        x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
        loss_fn = nn.CrossEntropyLoss()
        with DistributedPipeline(model, schedule="1f1b", chunks=4, loss_fn=loss_fn, log_tasks=False) as pipe:
            own = {id(p) for p in pipe.parameters()}
            calls.update(batched=0, outside=0)  # the step's messages only (building measured the clocks)
            loss = pipe.step(x, y)
            out.update(calls)
            ref = loss_fn(reference(x), y)
            ref.backward()
            out["loss"] = abs(loss.item() - ref.item())
            out["grad"] = max((p.grad - q.grad).abs().max().item()
                              for p, q in zip(model.parameters(), reference.parameters()) if id(p) in own)
            out["wire"] = str(pipe._comm.wire)
            out["messages"] = len(pipe.last_comm)
    finally:
        dist.batch_isend_irecv, dist.isend, dist.irecv = real_batch, real_isend, real_irecv
        c10d.isend, c10d.irecv = real_isend, real_irecv
