"""Scenarios for ``DistributedPipeline(mesh=...)``, run in 4 gloo processes (``tests/test_mesh.py``).

The mesh is ``init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))``:
process ``r`` is pipeline rank ``r // 2`` of replica ``r % 2``. Each replica
gets its half of the global batch, with different numbers of padded
(ignored) targets, and every check is against the plain model on the whole
batch in float64.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from world_process import run_in_world

from pipesched.distributed import DistributedPipeline, RemoteStepError

ROWS = 4  # per replica


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2 * ROWS, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (2 * ROWS,), generator=generator)
    y[[0, 5, 6, 7]] = -100  # replica 0 counts 3 tokens, replica 1 counts 1
    return x, y


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


_saved: dict = {}


def watch_reductions() -> list[str]:
    """Record, in order, FSDP's gradient reductions and the pipeline's end-of-step exchange over mesh['dp']."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from pipesched.distributed.mesh_parallel import MeshReplicas

    events: list[str] = []
    _saved["reduce"], _saved["exchange"] = _fsdp_param_group.foreach_reduce, MeshReplicas._exchange

    def reduce(*args, **kwargs):
        events.append("reduce")
        return _saved["reduce"](*args, **kwargs)

    def exchange(self, *args, **kwargs):
        events.append("exchange")
        return _saved["exchange"](self, *args, **kwargs)

    _fsdp_param_group.foreach_reduce, MeshReplicas._exchange = reduce, exchange
    return events


def unwatch_reductions() -> None:
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from pipesched.distributed.mesh_parallel import MeshReplicas

    _fsdp_param_group.foreach_reduce, MeshReplicas._exchange = _saved["reduce"], _saved["exchange"]


def scenario_exact(mesh, rank: int, schedule: str, kind: str, reduction: str = "mean") -> dict:
    """Two AdamW steps: loss, every owned parameter's full gradient, and the weights vs the plain model.

    ``reduction="mean"``: token-normalised (replicas count 3 and 1 tokens); ``"sum"``: a summed loss."""
    model, reference = mlp(), mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(rank % 2)  # replica 1 starts elsewhere: every replica must start from the dp root's weights
    x, y = data()
    mine = slice(ROWS * (rank % 2), ROWS * (rank % 2) + ROWS)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.1)
    errors = {"loss": 0.0, "grad": 0.0, "weight": 0.0, "input": 0.0, "input_seen": False}
    pipe = DistributedPipeline(model, schedule=schedule, chunks=2, loss_fn=loss_fn, mesh=mesh,
                               data_parallel=kind, log_tasks=False)
    own = {id(p) for p in pipe.parameters()}
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=0.1)  # its state: DTensors, sharded under fsdp
    sharded = any(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in pipe.parameters())
    for step in range(2):
        events = watch_reductions() if step == 0 else None
        ref_opt.zero_grad()
        ref_x = x.clone().requires_grad_(True)
        ref_loss = loss_fn(reference(ref_x), y)
        ref_loss.backward()
        optimizer.zero_grad()
        part = x[mine].clone().requires_grad_(True)
        loss = pipe.step(part, y[mine])
        if part.grad is not None:  # stage 0's rank: the input's gradient is its share of the global batch's
            errors["input"] = max(errors["input"], (part.grad - ref_x.grad[mine]).abs().max().item())
            errors["input_seen"] = True
        if events is not None:
            errors["reductions"] = list(events)
            unwatch_reductions()
        errors["loss"] = max(errors["loss"], abs(loss.item() - ref_loss.item()))
        for p, q in zip(model.parameters(), reference.parameters()):
            if id(p) in own:
                errors["grad"] = max(errors["grad"], (full(p.grad) - q.grad).abs().max().item())
        ref_opt.step()
        optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        if id(p) in own:
            errors["weight"] = max(errors["weight"], (full(p) - q).abs().max().item())
    # a step that fails on one replica fails on every one and changes no gradient
    before = [full(p.grad).clone() for p in pipe.parameters()]
    try:
        pipe.step(x[mine], y[mine] if rank % 2 else y[:2])  # replica 0's targets do not match its inputs
        raised = None
    except (RemoteStepError, ValueError) as error:
        raised = f"{type(error).__name__}: {error}"
    unchanged = all(torch.equal(a, full(p.grad)) for a, p in zip(before, pipe.parameters()))
    optimizer.zero_grad()
    ref_opt.zero_grad()
    ref_loss = loss_fn(reference(x), y)
    ref_loss.backward()
    after = abs(pipe.step(x[mine], y[mine]).item() - ref_loss.item())
    for p, q in zip(model.parameters(), reference.parameters()):
        if id(p) in own:
            after = max(after, (full(p.grad) - q.grad).abs().max().item())
    forward = pipe(x[mine])
    if forward is not None:
        after = max(after, (forward - reference(x)[mine]).abs().max().item())
    resharded = all(isinstance(p, DTensor) for p in model.parameters() if id(p) in own) or kind == "ddp"
    pipe.close()
    return {**errors, "sharded": sharded, "raised": raised, "unchanged": unchanged, "after": after,
            "resharded": resharded}


def scenario_refusals(mesh, rank: int) -> dict:
    """Bad arguments are refused by name, with the fix, on every rank (nothing hangs)."""
    refused = {}
    flat = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    for name, kwargs in {"no_pp": {"mesh": flat}, "kind": {"mesh": mesh, "data_parallel": "zero3"},
                         "both": {"mesh": mesh, "group": dist.group.WORLD},
                         "not_mesh": {"mesh": "pp"}}.items():
        try:
            DistributedPipeline(mlp(), loss_fn=nn.CrossEntropyLoss(), **kwargs)
            refused[name] = None
        except (TypeError, ValueError) as error:
            refused[name] = f"{type(error).__name__}: {error}"
    try:
        DistributedPipeline(mlp(), loss_fn=nn.CrossEntropyLoss(), mesh=mesh, deferred_batch_norm=True)
        refused["deferred_batch_norm"] = None
    except NotImplementedError as error:
        refused["deferred_batch_norm"] = f"{type(error).__name__}: {error}"
    return refused


CASES = [(schedule, kind) for kind in ("fsdp", "ddp") for schedule in ("gpipe", "1f1b", "zb-h1")]
CASES += [("interleaved-1f1b", "fsdp"), ("zb-v", "fsdp"), ("zb-v", "ddp")]  # 2 stages per rank


def entry(rank: int, world: int, port: int, names: list[str], directory: str) -> None:
    """Process entry point: every case in order, verdicts written to ``rank<r>.json``."""

    def body(out: dict) -> None:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        for schedule, kind in CASES:
            out[f"{schedule}-{kind}"] = scenario_exact(mesh, rank, schedule, kind)
        out["summed"] = scenario_exact(mesh, rank, "1f1b", "fsdp", reduction="sum")
        out["refusals"] = scenario_refusals(mesh, rank)

    run_in_world(rank, world, port, directory, body)


if __name__ == "__main__":  # a quick look: python tests/mesh_scenarios.py
    import sys
    import tempfile

    sys.path.insert(0, os.path.dirname(__file__))
    from test_distributed import run_world

    with tempfile.TemporaryDirectory() as folder:
        for result in run_world(4, [], __import__("pathlib").Path(folder), entry=entry):
            print(copy.deepcopy(result))
