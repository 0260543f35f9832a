"""pp across nodes, FSDP2 within each node: the multi-node recipe of docs/guide (Going multi-node).

Run one launcher per node (here two "nodes" on one machine, two processes each)::

    torchrun --nnodes=2 --node-rank=0 --nproc-per-node=2 \\
        --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29400 examples/multinode_mesh.py
    torchrun --nnodes=2 --node-rank=1 --nproc-per-node=2 \\
        --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29400 examples/multinode_mesh.py

torchrun numbers the processes node by node (node 0: ranks 0, 1; node 1:
ranks 2, 3), and ``init_device_mesh(..., (nodes, per_node), ("pp", "dp"))``
lays the mesh out row by row, so ``mesh["dp"]`` (the chatty FSDP
collectives) stays inside a node and ``mesh["pp"]`` (one activation per
micro-batch and stage boundary) crosses nodes. Each step's loss and every
parameter's full gradient are compared with the plain model on the global
batch (float64); the script exits with status 1 if any differs, and writes
each process's figures to ``--out`` (a folder) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from pipesched.distributed import DistributedPipeline


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).double()


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for each process's rank<r>.json")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # torchrun set RANK, WORLD_SIZE, MASTER_*
    rank, world = dist.get_rank(), dist.get_world_size()
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    mesh = init_device_mesh("cpu", (world // per_node, per_node), mesh_dim_names=("pp", "dp"))
    net, reference = model(), model()
    pipe = DistributedPipeline(net, schedule="1f1b", chunks=2, loss_fn=nn.CrossEntropyLoss(), mesh=mesh,
                               data_parallel="fsdp", stall_timeout=60.0)
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=0.01)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.01)
    own = {id(p) for p in pipe.parameters()}
    replica, replicas = mesh.get_local_rank("dp"), mesh.size(1)
    worst = 0.0
    for step in range(args.steps):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(8 * replicas, 16, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 4, (8 * replicas,), generator=generator)
        mine = slice(8 * replica, 8 * replica + 8)  # this replica's share of the global batch
        optimizer.zero_grad()
        loss = pipe.step(x[mine], y[mine])
        ref_optimizer.zero_grad()
        ref_loss = nn.CrossEntropyLoss()(reference(x), y)
        ref_loss.backward()
        worst = max(worst, abs(loss.item() - ref_loss.item()))
        for p, q in zip(net.parameters(), reference.parameters()):
            if id(p) in own:
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                worst = max(worst, (grad - q.grad).abs().max().item())
        optimizer.step()
        ref_optimizer.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.6f}, largest difference from the plain model {worst:.2e}")
    if args.out:
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as file:
            json.dump({"rank": rank, "node": int(os.environ["GROUP_RANK"]), "pp": mesh.get_local_rank("pp"),
                       "dp": replica, "worst": worst, "steps": args.steps}, file)
    pipe.close()
    dist.destroy_process_group()
    return worst


if __name__ == "__main__":
    sys.exit(0 if main() <= 1e-12 else 1)
