"""Distributed checkpoints across layouts (``tests/test_dcp.py``), in gloo processes on CPU.

``entry_save`` (4 processes, pp=2 x dp=2 under FSDP2) trains one AdamW step,
saves ``{"model": pipe.state_dict(), "optim": optimizer_state_dict(pipe, opt)}``
with ``torch.distributed.checkpoint``, and keeps training: that is the run
that never stopped. ``entry_load`` starts another layout from perturbed
weights and a fresh optimizer, loads the checkpoint and trains the same
steps. Every process also trains the plain model on the global batch in
float64, so each layout's losses, full gradients and weights after each
step are compared with the same uninterrupted reference.
"""

from __future__ import annotations

import torch
from dist_scenarios import run_scenarios
from mesh_scenarios import data, full
from torch import nn
from torch.distributed import checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh

from pipesched.distributed import DistributedPipeline, load_optimizer_state_dict, optimizer_state_dict

STEPS_AFTER = 2  # steps trained after the checkpoint, by every layout


def mlp() -> nn.Sequential:
    """Four weighted layers, so that every process of pp=4 holds parameters."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                         nn.Linear(6, 4)).double()


BALANCE = {"pp2xdp2": (4, 3), "pp2xdp1": (4, 3), "pp4": (2, 2, 2, 1)}


def optimizer(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=0.05, weight_decay=0.1)


def loss_fn() -> nn.Module:
    return nn.CrossEntropyLoss()  # token-normalised: the padded targets of data() are ignored


class Reference:
    """The plain model on the global batch, stepped alongside (the run that never stopped)."""

    def __init__(self):
        self.model = mlp()
        self.optimizer = optimizer(self.model.parameters())
        self.x, self.y = data()

    def step(self) -> float:
        self.optimizer.zero_grad()
        loss = loss_fn()(self.model(self.x), self.y)
        loss.backward()
        return loss.item()


def compare(pipe, model: nn.Module, reference: Reference, loss: torch.Tensor, what: str) -> float:
    """Largest difference of the loss and of ``what`` ("grad" or "data") of this process's parameters."""
    own = {id(p) for p in pipe.parameters()}
    worst = abs(loss.item() - reference.last_loss)
    for p, q in zip(model.parameters(), reference.model.parameters()):
        if id(p) in own:
            worst = max(worst, (full(getattr(p, what)) - getattr(q, what)).abs().max().item())
    return worst


def train(pipe, model, opt, reference: Reference, rows: slice, steps: int) -> list[float]:
    """``steps`` steps of the pipeline and of the reference; per step, the worst loss/grad/weight error."""
    errors = []
    for _ in range(steps):
        reference.last_loss = reference.step()
        opt.zero_grad()
        loss = pipe.step(reference.x[rows], reference.y[rows])
        grad = compare(pipe, model, reference, loss, "grad")
        opt.step()
        reference.optimizer.step()
        errors.append(max(grad, compare(pipe, model, reference, loss, "data")))
    return errors


def layout(name: str, rank: int) -> tuple[dict, slice]:
    """DistributedPipeline arguments and this process's rows of the global batch, per layout."""
    rows = data()[0].shape[0]
    if name == "pp2xdp2":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        half = rows // 2
        return {"mesh": mesh, "data_parallel": "fsdp"}, slice(half * (rank % 2), half * (rank % 2) + half)
    if name == "pp2xdp1":
        return {"mesh": init_device_mesh("cpu", (2, 1), mesh_dim_names=("pp", "dp"))}, slice(0, rows)
    if name == "pp4":
        return {}, slice(0, rows)  # one process per stage, no data parallelism
    raise ValueError(name)


def entry_save(rank: int, world: int, port: int, names: list[str], directory: str) -> None:
    """pp=2 x dp=2 (FSDP2): one step, save, then the uninterrupted steps."""
    checkpoint = names[0]

    def run(out: dict) -> None:
        name = "pp2xdp2"
        kwargs, rows = layout(name, rank)
        reference, model = Reference(), mlp()
        pipe = DistributedPipeline(model, schedule="1f1b", chunks=2, loss_fn=loss_fn(), log_tasks=False,
                                   balance=BALANCE[name], **kwargs)
        opt = optimizer(pipe.parameters())
        out["before"] = train(pipe, model, opt, reference, rows, 1)
        state = {"model": pipe.state_dict(), "optim": optimizer_state_dict(pipe, opt)}
        out["keys"] = sorted(state["model"]) + sorted(state["optim"])
        dcp.save(state, checkpoint_id=checkpoint)
        out["after"] = train(pipe, model, opt, reference, rows, STEPS_AFTER)
        pipe.close()

    _run(rank, world, port, directory, run)


def entry_load(rank: int, world: int, port: int, names: list[str], directory: str) -> None:
    """Another layout (``names[1]``): perturbed weights, fresh optimizer, load, train the same steps."""
    checkpoint, name = names

    def run(out: dict) -> None:
        kwargs, rows = layout(name, rank)
        reference, model = Reference(), mlp()
        train_reference(reference, 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # must come from the checkpoint, not from the seed
        pipe = DistributedPipeline(model, schedule="1f1b", chunks=2, loss_fn=loss_fn(), log_tasks=False,
                                   balance=BALANCE[name], **kwargs)
        opt = optimizer(pipe.parameters())
        state = {"model": pipe.state_dict(), "optim": optimizer_state_dict(pipe, opt)}
        out["keys"] = sorted(state["model"]) + sorted(state["optim"])
        dcp.load(state, checkpoint_id=checkpoint)
        pipe.load_state_dict(state["model"])
        load_optimizer_state_dict(pipe, opt, state["optim"])
        out["after"] = train(pipe, model, opt, reference, rows, STEPS_AFTER)
        pipe.close()

    _run(rank, world, port, directory, run)


def train_reference(reference: Reference, steps: int) -> None:
    for _ in range(steps):
        reference.step()
        reference.optimizer.step()


def _run(rank: int, world: int, port: int, directory: str, run) -> None:
    """``run(out)`` in one process of the gloo world, through the shared harness (verdicts to rank<r>.json)."""
    run_scenarios(rank, world, port, ["dcp"], directory, lambda _, out: run(out))
