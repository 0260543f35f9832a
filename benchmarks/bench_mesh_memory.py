"""What each process holds under ``DistributedPipeline(mesh=...)``: ``"fsdp"`` vs ``"ddp"``, pp=2 x dp=2.

Four gloo processes on 127.0.0.1 (``init_device_mesh("cpu", (2, 2),
mesh_dim_names=("pp", "dp"))``), a float32 MLP of 8 ``Linear(256, 256)``
layers cut into 2 stages, one training step with AdamW. Per process, the
bytes of this process's parameters, gradients and optimizer state (local
shards of DTensors: what the process actually stores between steps). FSDP
shards each stage over the 2 replicas, so every figure should be about half
of ``"ddp"``'s (the replicated stage). Not part of the suite (no target,
no timing): run it on its own::

    PYTHONPATH=$PWD python -m benchmarks.bench_mesh_memory
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

WIDTH, LAYERS, ROWS = 256, 8, 16


def local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def measure(kind: str, mesh) -> dict[str, int]:
    from pipesched.distributed import DistributedPipeline

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    pipe = DistributedPipeline(model, schedule="1f1b", chunks=2, loss_fn=nn.MSELoss(), mesh=mesh,
                               data_parallel=kind, log_tasks=False)
    optimizer = torch.optim.AdamW(pipe.parameters())
    x, y = torch.randn(ROWS, WIDTH), torch.randn(ROWS, WIDTH)
    pipe.step(x, y)
    optimizer.step()
    params = list(pipe.parameters())
    state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    figures = {"parameters": sum(map(local_bytes, params)), "gradients": sum(local_bytes(p.grad) for p in params),
               "optimizer_state": sum(map(local_bytes, state))}
    pipe.close()
    return figures


def entry(rank: int, world: int, port: int, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    out = {kind: measure(kind, mesh) for kind in ("ddp", "fsdp")}
    Path(directory, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=entry, args=(rank, 4, port, directory)) for rank in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(300)
            if process.is_alive():
                process.kill()
                sys.exit("a process did not finish within 300 s")
        rows = [json.loads(Path(directory, f"rank{rank}.json").read_text()) for rank in range(4)]
    print(f"pp=2 x dp=2, {LAYERS} x Linear({WIDTH}, {WIDTH}) float32, AdamW, bytes per process")
    print(f"{'rank':>4} {'pp':>2} {'dp':>2} {'kind':>5} {'parameters':>11} {'gradients':>10} {'optimizer':>10} "
          f"{'total':>10}")
    for rank, row in enumerate(rows):
        for kind in ("ddp", "fsdp"):
            f = row[kind]
            total = sum(f.values())
            print(f"{rank:>4} {rank // 2:>2} {rank % 2:>2} {kind:>5} {f['parameters']:>11} {f['gradients']:>10} "
                  f"{f['optimizer_state']:>10} {total:>10}")
        print(f"{'':>4} fsdp/ddp total: {sum(row['fsdp'].values()) / sum(row['ddp'].values()):.3f}")


if __name__ == "__main__":
    main()
