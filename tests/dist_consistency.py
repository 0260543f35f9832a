"""Scenarios run inside 2 gloo processes by tests/test_distributed_consistency.py.

What both pipelines must agree on: input gradients through ``step()``, the
backward half under data parallelism, every rank's options, and sparse
gradients refused before anything is built. Each scenario computes its own
float64 reference from the same seeds and writes a verdict per rank.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from dist_scenarios import data, grad_error, mlp, run_scenarios


def scenario_input_grads(rank: int, world: int, out: dict) -> None:
    """``x.grad`` on stage 0's rank equals the plain model's, as ``Pipeline.step`` writes it."""
    from pipesched.distributed import DistributedPipeline

    model = mlp(layers=5)
    reference = copy.deepcopy(model)
    x, y = data(12)
    ref_x = x.clone().requires_grad_(True)
    nn.CrossEntropyLoss()(reference(ref_x), y).backward()
    for schedule in ["gpipe", "zb-h1"]:  # zb-h1: split backward (B writes the input gradient, W the weights')
        part = x.clone().requires_grad_(True)
        with DistributedPipeline(copy.deepcopy(model), schedule=schedule, chunks=4,
                                 loss_fn=nn.CrossEntropyLoss()) as pipe:
            pipe.step(part if rank == 0 else None, y)
            weights = grad_error(pipe, reference)
        error = None if part.grad is None else (part.grad - ref_x.grad).abs().max().item()
        out[f"input_grads:{schedule}"] = {
            "ok": weights < 1e-12 and (error is not None and error < 1e-12 if rank == 0 else True),
            "input_grad_error": error, "grad_error": weights,
        }


def scenario_input_grads_dp(rank: int, world: int, out: dict) -> None:
    """Two one-process pipelines joined by a data-parallel group, unequal tokens per process: each
    process's inputs get their share of the global batch's input gradient, as with ``Pipeline``."""
    from pipesched.distributed import DistributedPipeline

    pipelines = [dist.new_group([r]) for r in range(world)]  # every process creates every group, in order
    model = mlp(layers=5)
    reference = copy.deepcopy(model)
    x, y = data(6 * world)
    y[[6 * r + k for r in range(1, world) for k in range(r % 3 + 1)]] = -100  # unequal token counts
    loss_fn = nn.CrossEntropyLoss()
    ref_x = x.clone().requires_grad_(True)
    ref_loss = loss_fn(reference(ref_x), y)
    ref_loss.backward()
    mine = slice(6 * rank, 6 * rank + 6)
    part = x[mine].clone().requires_grad_(True)
    with DistributedPipeline(model, schedule="gpipe", chunks=3, loss_fn=loss_fn, group=pipelines[rank],
                             data_parallel_group=dist.group.WORLD) as pipe:
        loss = pipe.step(part, y[mine])
        weights = grad_error(pipe, reference)
    error = None if part.grad is None else (part.grad - ref_x.grad[mine]).abs().max().item()
    out["input_grads_dp"] = {
        "ok": weights < 1e-12 and error is not None and error < 1e-12 and abs(loss.item() - ref_loss.item()) < 1e-12,
        "input_grad_error": error, "grad_error": weights,
    }


def scenario_backward_half_dp(rank: int, world: int, out: dict) -> None:
    """``loss_fn(pipe(x), y).backward()`` with ``data_parallel_group``: two SGD steps leave every
    replica the plain model's gradients and weights on the whole batch (equal halves, a mean loss)."""
    from pipesched import Pipeline
    from pipesched.distributed import DistributedPipeline

    model = mlp(layers=5)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(rank)  # another seed: the pipeline starts from process 0's weights
    x, y = data(6 * world)
    mine = slice(6 * rank, 6 * rank + 6)
    loss_fn = nn.CrossEntropyLoss()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    grads, inputs, apart = [], [], []
    with Pipeline(model, schedule="gpipe", balance=[3, 2], devices=["cpu", "cpu"], chunks=3,
                  data_parallel_group=dist.group.WORLD) as pipe:
        optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5)
        for _ in range(2):
            ref_x = x.clone().requires_grad_(True)
            ref_opt.zero_grad()
            loss_fn(reference(ref_x), y).backward()
            optimizer.zero_grad()
            part = x[mine].clone().requires_grad_(True)
            loss_fn(pipe(part), y[mine]).backward()
            grads.append(max((p.grad - q.grad).abs().max().item()
                             for p, q in zip(model.parameters(), reference.parameters())))
            inputs.append((part.grad - ref_x.grad[mine]).abs().max().item())
            flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            every = [torch.zeros_like(flat) for _ in range(world)]
            dist.all_gather(every, flat)
            apart.append(max((every[0] - other).abs().max().item() for other in every))
            ref_opt.step()
            optimizer.step()
        weights = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        # a forward failing on replica 1 fails replica 0's backward (no wait), changes no gradient
        before = [p.grad.clone() for p in model.parameters()]
        try:
            loss_fn(pipe(x[mine][:, :5] if rank == 1 else x[mine]), y[mine]).backward()
            failed = None
        except RuntimeError as error:  # rank 1: torch's shape error; rank 0: RemoteStepError
            failed = f"{type(error).__name__}: {error}"
        unchanged = all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
        optimizer.zero_grad()
        ref_opt.zero_grad()
        loss_fn(reference(x), y).backward()
        loss_fn(pipe(x[mine]), y[mine]).backward()
        after = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
    # DistributedPipeline's pipe(x) keeps nothing for a backward: its backward must raise, not drift
    pipelines = [dist.new_group([r]) for r in range(world)]
    with DistributedPipeline(mlp(layers=5), schedule="gpipe", chunks=3, group=pipelines[rank],
                             data_parallel_group=dist.group.WORLD) as pipe:
        try:
            loss_fn(pipe(x[mine]), y[mine]).backward()
            distributed = None
        except RuntimeError as error:
            distributed = str(error)
    out["backward_half_dp"] = {
        "ok": max(grads) < 1e-12 and max(inputs) < 1e-12 and max(apart) == 0.0 and weights < 1e-12,
        "grad_error": max(grads), "input_grad_error": max(inputs), "replicas_apart": max(apart),
        "weight_error": weights, "distributed_raised": distributed,
        "failed": failed, "unchanged": unchanged, "next_grad_error": after,
    }


def scenario_mismatched_options(rank: int, world: int, out: dict) -> None:
    """Ranks built with different options fail in the constructor, on every rank, naming the option
    and each rank's value (not at the first step, after stall_timeout); the group stays usable."""
    from pipesched.distributed import DistributedPipeline

    cases = {
        "chunks": dict(chunks=2 if rank == 0 else 4),
        "schedule": dict(schedule="gpipe" if rank == 0 else "1f1b"),
        "balance": dict(balance=[3, 2] if rank == 0 else [2, 3]),
        "checkpoint": dict(checkpoint="never" if rank == 0 else "always"),
    }
    for option, kwargs in cases.items():
        try:
            pipe = DistributedPipeline(mlp(layers=5), loss_fn=nn.CrossEntropyLoss(), **kwargs)
            pipe.close()
            out[f"mismatch:{option}"] = None
        except ValueError as error:
            out[f"mismatch:{option}"] = str(error)
    try:  # a value one rank refuses on its own: that rank raises its error, the others name it
        DistributedPipeline(mlp(layers=5), chunks=0 if rank == 1 else 2).close()
        out["mismatch:refused"] = None
    except (ValueError, RuntimeError) as error:
        out["mismatch:refused"] = f"{type(error).__name__}: {error}"
    x, y = data(8)
    with DistributedPipeline(mlp(layers=5), chunks=2, loss_fn=nn.CrossEntropyLoss()) as pipe:
        out["mismatch:after"] = pipe.step(x if rank == 0 else None, y).item()


def scenario_sparse(rank: int, world: int, out: dict) -> None:
    """Sparse gradients cannot cross processes through the flat host buffers: refused when the
    pipeline is built, naming the parameter and the fix (data parallelism and tied weights)."""
    from pipesched.distributed import DistributedPipeline

    def embedded(sparse: bool) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 8, sparse=sparse), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))

    pipelines = [dist.new_group([r]) for r in range(world)]
    try:
        DistributedPipeline(embedded(True), group=pipelines[rank], data_parallel_group=dist.group.WORLD).close()
        out["sparse:data_parallel"] = None
    except ValueError as error:
        out["sparse:data_parallel"] = str(error)
    tied = embedded(True)
    head = nn.Linear(8, 10, bias=False)
    head.weight = tied[0].weight
    tied = nn.Sequential(*tied[:3], head)
    try:
        DistributedPipeline(tied, loss_fn=nn.CrossEntropyLoss()).close()
        out["sparse:tied"] = None
    except ValueError as error:
        out["sparse:tied"] = str(error)


SCENARIOS = {
    "input_grads": scenario_input_grads,
    "input_grads_dp": scenario_input_grads_dp,
    "backward_half_dp": scenario_backward_half_dp,
    "mismatched_options": scenario_mismatched_options,
    "sparse": scenario_sparse,
}


def entry(rank: int, world: int, port: int, names: list[str], directory: str) -> None:
    """Process entry point: run the named scenarios in order, write the verdicts."""
    run_scenarios(rank, world, port, names, directory, lambda name, out: SCENARIOS[name](rank, world, out), isolate=True)
