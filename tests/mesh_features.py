"""What a pp=2 x dp=2 mesh supports beyond plain training, run in 4 gloo processes (``tests/test_mesh_features.py``).

Process ``r`` is pipeline rank ``r // 2`` of replica ``r % 2``; each replica
gets its half of the global batch (padded targets: the replicas count
different numbers of tokens) and its own starting weights (every replica
must take the dp root's). Each scenario runs under ``"fsdp"`` and ``"ddp"``
and compares, in float64, with the plain model on the whole batch: clipping
over pp x dp, a ``GradScaler`` (a finite step, then an inf on one replica
only), weights tied across the stages, a loss function with a parameter,
and buffers (constant ones, and batch-norm statistics: the first replica's).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mesh_scenarios import ROWS, data, full, mlp
from tied_models import VOCAB, gpt_balance, gpt_like
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from world_process import run_in_world

from pipesched.distributed import DistributedPipeline

KINDS = ("fsdp", "ddp")
TIED_SCHEDULES = ("gpipe", "zb-h1")


def _mine(rank: int) -> slice:
    return slice(ROWS * (rank % 2), ROWS * (rank % 2) + ROWS)


def _perturb(model: nn.Module, rank: int) -> nn.Module:
    with torch.no_grad():  # replica 1 starts elsewhere: every replica must start from the dp root's
        for p in model.parameters():
            p.add_(rank % 2)
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(rank % 2)
    return model


def _pairs(model: nn.Module, reference: nn.Module, own: set[int]) -> list:
    """(this process's parameter, the plain model's) by name: FSDP2 replaced the owned ones, so a weight
    tied across stages is one object in the plain model and two here."""
    mine = dict(model.named_parameters(remove_duplicate=False))
    return [(mine[name], q) for name, q in reference.named_parameters(remove_duplicate=False)
            if id(mine[name]) in own]


def _grad_error(model: nn.Module, reference: nn.Module, own: set[int]) -> float:
    return max([(full(p.grad) - q.grad).abs().max().item() for p, q in _pairs(model, reference, own)
                if q.grad is not None] or [0.0])


def _weight_error(model: nn.Module, reference: nn.Module, own: set[int]) -> float:
    return max([(full(p) - q).abs().max().item() for p, q in _pairs(model, reference, own)] or [0.0])


def scenario_clip(mesh, rank: int, kind: str, schedule: str = "1f1b") -> dict:
    """``pipe.clip_grad_norm_`` over pp x dp: the total norm and the clipped gradients equal torch's on
    the plain model; then an SGD step equals torch's."""
    out = {}
    for norm_type in (2.0, float("inf")):
        model, reference = _perturb(mlp(), rank), mlp()
        x, y = data()
        loss_fn = nn.CrossEntropyLoss()
        pipe = DistributedPipeline(model, schedule=schedule, chunks=2, loss_fn=loss_fn, mesh=mesh,
                                   data_parallel=kind, log_tasks=False)
        own = {id(p) for p in pipe.parameters()}
        optimizer, ref_opt = torch.optim.SGD(pipe.parameters(), lr=0.5), torch.optim.SGD(reference.parameters(), lr=0.5)
        pipe.step(x[_mine(rank)], y[_mine(rank)])
        loss_fn(reference(x), y).backward()
        want = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05, norm_type)
        got = pipe.clip_grad_norm_(0.05, norm_type)
        name = "inf" if norm_type == float("inf") else "2"
        out[f"norm_{name}"] = abs(got.item() - want.item())
        out[f"clipped_{name}"] = want.item() > 0.05  # the clip did scale
        out[f"grad_{name}"] = _grad_error(model, reference, own)
        optimizer.step()
        ref_opt.step()
        out[f"weight_{name}"] = _weight_error(model, reference, own)
        pipe.close()
    return out


def scenario_scaler(mesh, rank: int, kind: str) -> dict:
    """A ``GradScaler`` per process: a finite step equals the plain model's scaled step; an inf in one
    replica's inputs only makes every process skip and back off, as the plain model's one scaler does."""
    model, reference = _perturb(mlp(), rank), mlp()
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    pipe = DistributedPipeline(model, schedule="zb-h1", chunks=2, loss_fn=loss_fn, mesh=mesh, data_parallel=kind,
                               log_tasks=False)
    own = {id(p) for p in pipe.parameters()}
    optimizer, ref_opt = torch.optim.AdamW(pipe.parameters(), lr=0.1), torch.optim.AdamW(reference.parameters(), lr=0.1)
    scaler, ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8), torch.amp.GradScaler("cpu", init_scale=2.0**8)
    out = {"grad": 0.0, "weight": [], "scale": []}
    bad = x.clone()
    bad[ROWS + 1, 0] = float("inf")  # in replica 1's half only
    for batch in (x, bad, x):
        optimizer.zero_grad()
        ref_opt.zero_grad()
        pipe.step(batch[_mine(rank)], y[_mine(rank)], scaler=scaler)
        ref_scaler.scale(loss_fn(reference(batch), y)).backward()
        if batch is x:
            out["grad"] = max(out["grad"], _grad_error(model, reference, own))
        for s, o in ((scaler, optimizer), (ref_scaler, ref_opt)):
            s.step(o)
            s.update()
        out["weight"].append(_weight_error(model, reference, own))
        out["scale"].append((scaler.get_scale(), ref_scaler.get_scale()))
    pipe.close()
    return out


class TemperedLoss(nn.Module):
    """Cross-entropy of ``logits * temperature``, ``temperature`` learnt: a loss function with a parameter,
    normalised by its kept tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits * self.temperature, targets)

    def loss_normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets != -100).sum()


def scenario_loss_parameters(mesh, rank: int, kind: str) -> dict:
    """The loss's parameter starts equal on every replica, and its gradient is summed over ``mesh["dp"]``
    with each replica's token share: the plain model's on the global batch; weights after AdamW too."""
    model, reference = _perturb(mlp(), rank), mlp()
    loss_fn, ref_loss_fn = TemperedLoss(), TemperedLoss()
    with torch.no_grad():
        loss_fn.temperature.add_(rank % 2)  # replica 1 elsewhere: the dp root's must win
    x, y = data()
    pipe = DistributedPipeline(model, schedule="gpipe", chunks=2, loss_fn=loss_fn, mesh=mesh, data_parallel=kind,
                               log_tasks=False)
    own = {id(p) for p in pipe.parameters()}
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=0.1)
    ref_opt = torch.optim.AdamW(list(reference.parameters()) + list(ref_loss_fn.parameters()), lr=0.1)
    out = {"loss": 0.0, "grad": 0.0, "loss_grad": None, "weight": 0.0}
    for _ in range(2):
        optimizer.zero_grad()
        ref_opt.zero_grad()
        loss = pipe.step(x[_mine(rank)], y[_mine(rank)])
        ref = ref_loss_fn(reference(x), y)
        ref.backward()
        out["loss"] = max(out["loss"], abs(loss.item() - ref.item()))
        out["grad"] = max(out["grad"], _grad_error(model, reference, own))
        if loss_fn.temperature.grad is not None:  # the last stage's processes
            error = abs(loss_fn.temperature.grad.item() - ref_loss_fn.temperature.grad.item())
            out["loss_grad"] = max(out["loss_grad"] or 0.0, error)
        optimizer.step()
        ref_opt.step()
    out["weight"] = _weight_error(model, reference, own)
    if rank >= 2:
        out["weight"] = max(out["weight"], abs(loss_fn.temperature.item() - ref_loss_fn.temperature.item()))
    pipe.close()
    return out


def scenario_tied(mesh, rank: int, kind: str, schedule: str) -> dict:
    """A GPT-like model whose embedding is its head's projection and whose first two blocks share a
    weight, both across the two pipeline ranks: full gradients, clipping, and the weights after AdamW
    equal the plain model's, and every copy of a tied weight stays the same."""
    model, reference = _perturb(gpt_like(6), rank), gpt_like(6)
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (2 * ROWS, 5), generator=generator)
    y = torch.randint(0, VOCAB, (2 * ROWS, 5), generator=generator)
    y[ROWS:, 3:] = -100  # replica 1 counts fewer tokens
    loss_fn = nn.CrossEntropyLoss()

    def flat(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(out.reshape(-1, VOCAB), target.reshape(-1))

    pipe = DistributedPipeline(model, schedule=schedule, chunks=2, balance=gpt_balance(6, 2), loss_fn=flat,
                               loss_normalizer=lambda t: (t != -100).sum(), mesh=mesh, data_parallel=kind,
                               log_tasks=False)
    own = {id(p) for p in pipe.parameters()}
    optimizer, ref_opt = torch.optim.AdamW(pipe.parameters(), lr=0.1), torch.optim.AdamW(reference.parameters(), lr=0.1)
    out = {"loss": 0.0, "grad": 0.0, "norm": 0.0, "weight": 0.0}
    for _ in range(2):
        optimizer.zero_grad()
        ref_opt.zero_grad()
        loss = pipe.step(x[_mine(rank)], y[_mine(rank)])
        ref = flat(reference(x), y)
        ref.backward()
        out["loss"] = max(out["loss"], abs(loss.item() - ref.item()))
        want = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        out["norm"] = max(out["norm"], abs(pipe.clip_grad_norm_(0.5).item() - want.item()))
        out["grad"] = max(out["grad"], _grad_error(model, reference, own))
        optimizer.step()
        ref_opt.step()
    out["weight"] = _weight_error(model, reference, own)
    pipe.close()
    return out


def scenario_buffers(mesh, rank: int, kind: str) -> dict:
    """Constant buffers start as the dp root's (gradients exact); batch-norm running statistics are the
    first replica's after every step (DDP's ``broadcast_buffers``), equal on every replica."""
    out = {}
    torch.manual_seed(0)
    shifted = nn.Sequential(nn.Linear(8, 6), Shift(6), nn.Tanh(), nn.Linear(6, 4)).double()
    reference = nn.Sequential(nn.Linear(8, 6), Shift(6), nn.Tanh(), nn.Linear(6, 4)).double()
    reference.load_state_dict(shifted.state_dict())
    _perturb(shifted, rank)
    x, y = data()
    loss_fn = nn.CrossEntropyLoss()
    pipe = DistributedPipeline(shifted, schedule="1f1b", chunks=2, loss_fn=loss_fn, mesh=mesh, data_parallel=kind,
                               log_tasks=False)
    own = {id(p) for p in pipe.parameters()}
    loss = pipe.step(x[_mine(rank)], y[_mine(rank)])
    ref = loss_fn(reference(x), y)
    ref.backward()
    out["loss"] = abs(loss.item() - ref.item())
    out["grad"] = _grad_error(shifted, reference, own)
    out["shift"] = max([(a - b).abs().max().item() for a, b in zip(shifted.buffers(), reference.buffers())]
                       or [0.0]) if rank < 2 else 0.0
    pipe.close()

    torch.manual_seed(0)
    normed = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4)).double()
    first = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4)).double()
    first.load_state_dict(normed.state_dict())
    _perturb(normed, rank)
    pipe = DistributedPipeline(normed, schedule="gpipe", chunks=1, loss_fn=loss_fn, mesh=mesh, data_parallel=kind,
                               log_tasks=False)
    for _ in range(2):
        pipe.step(x[_mine(rank)], y[_mine(rank)])
        loss_fn(first(x[_mine(0)]), y[_mine(0)]).backward()  # the first replica's statistics, on its half
    stats = [b.clone() for b in normed[1].buffers()] if rank < 2 else []
    out["stats"] = max([(a - b).abs().max().item() for a, b in zip(stats, first[1].buffers())] or [0.0])
    out["stats_seen"] = bool(stats)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [b.tolist() for b in stats])
    out["replicas_equal"] = gathered[0] == gathered[1] and gathered[2] == gathered[3]
    pipe.close()
    return out


class Shift(nn.Module):
    """Adds a constant buffer (a plain registered buffer, not a parameter)."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, width, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


def entry(rank: int, world: int, port: int, names: list[str], directory: str) -> None:
    """Process entry point: every scenario under both kinds, verdicts written to ``rank<r>.json``."""

    def body(out: dict) -> None:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        for kind in KINDS:
            out[f"clip-{kind}"] = scenario_clip(mesh, rank, kind)
            out[f"scaler-{kind}"] = scenario_scaler(mesh, rank, kind)
            out[f"loss_parameters-{kind}"] = scenario_loss_parameters(mesh, rank, kind)
            for schedule in TIED_SCHEDULES:
                out[f"tied-{schedule}-{kind}"] = scenario_tied(mesh, rank, kind, schedule)
            out[f"buffers-{kind}"] = scenario_buffers(mesh, rank, kind)

    run_in_world(rank, world, port, directory, body)
