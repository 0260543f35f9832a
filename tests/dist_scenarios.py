"""Code that runs inside the spawned processes of tests/test_distributed.py.

Each scenario computes its own single-process reference from the same seeds
and writes what it found (``ok`` plus details) to ``OUT/rank{r}.json``; the
test process only reads the verdicts.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
import math
import os
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


def mlp(layers: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(8, 16)]
    while len(mods) < layers - 1:
        mods.append(nn.Tanh() if len(mods) % 2 else nn.Linear(16, 16))
    mods.append(nn.Linear(16, 4))
    return nn.Sequential(*mods).double()


def data(rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (rows,), generator=g)


def grad_error(pipe, reference: nn.Module) -> float:
    """Largest difference between this rank's gradients and the reference's same parameters."""
    ref = dict(reference.named_parameters())
    worst = 0.0
    for name, param in pipe.named_parameters():
        original = name.split(".", 2)[2]  # local_stages.<stage>.<layer>.<param>
        worst = max(worst, (param.grad - ref[original].grad).abs().max().item())
    return worst


class Split(nn.Module):
    def forward(self, x):
        return x[:, :10] * 2.0, x[:, 10:].sin(), torch.full((x.shape[0],), 3, dtype=torch.long)


class Merge(nn.Module):
    def forward(self, parts):
        a, b, n = parts
        return torch.cat([a, b * n.unsqueeze(1).to(b.dtype)], dim=1)


class Features(OrderedDict):
    """A ModelOutput-like mapping type; importable in every process, so it crosses as itself."""


class ToFeatures(nn.Module):
    def forward(self, x):
        return Features(hidden=x.tanh(), count=torch.full((x.shape[0],), 2))


class FromFeatures(nn.Module):
    seen: list = []

    def forward(self, features):
        FromFeatures.seen.append((type(features).__name__, list(features)))
        return {"mixed": features["hidden"] * features["count"].unsqueeze(1).to(features["hidden"].dtype)}


class LastMapping(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 4)

    def forward(self, parts):
        return Features(logits=self.linear(parts["mixed"]))


class FailOnce(nn.Module):
    """Raises on its second call (a forward of micro-batch 1) while armed."""

    def __init__(self):
        super().__init__()
        self.calls, self.armed = 0, True

    def forward(self, x):
        self.calls += 1
        if self.armed and self.calls == 2:
            raise ValueError("injected failure")
        return x


def scenario_gradients(rank: int, world: int, out: dict) -> None:
    from pipesched.distributed import DistributedPipeline

    shapes = [("gpipe", None), ("1f1b", None), ("interleaved-1f1b", None), ("zb-h1", None)]
    for schedule, balance in shapes:
        for rows, chunks in [(11, 4), (3, 8)]:  # uneven split; fewer rows than chunks
            model = mlp(layers=4 * world if schedule.startswith("interleaved") else 2 * world + 1)
            x, y = data(rows)
            reference = copy.deepcopy(model)
            ref_loss = nn.CrossEntropyLoss()(reference(x), y)
            ref_loss.backward()
            gather = rows == 11  # the other shape keeps each rank's own tasks (the default)
            with DistributedPipeline(model, schedule=schedule, balance=balance, chunks=chunks,
                                     checkpoint="except_last", loss_fn=nn.CrossEntropyLoss(),
                                     gather_timeline=gather) as pipe:
                loss = pipe.step(x if rank == 0 else None, y)
                key = f"{schedule}/{rows}x{chunks}"
                out[key] = {
                    "ok": abs(loss.item() - ref_loss.item()) < 1e-12 and grad_error(pipe, reference) < 1e-12,
                    "loss": loss.item(), "ref": ref_loss.item(), "grad_error": grad_error(pipe, reference),
                    "microbatches": pipe.last_report.num_microbatches,
                    "tasks": len(pipe.last_report.tasks), "gathered": gather,
                    "ranks_in_report": sorted({t.rank for t in pipe.last_report.tasks}),
                    "memory_ranks": len(pipe.last_report.peak_activation_bytes),
                }


def scenario_forward_and_placement(rank: int, world: int, out: dict) -> None:
    """What the single-process pipeline had and this one lacked: forward(), the .to() guard,
    device checks and a finalizer."""
    import gc
    import threading

    from pipesched.distributed import DistributedPipeline

    model = mlp(layers=2 * world)
    x, _ = data(10)
    with torch.no_grad():
        expected = model(x)
    pipe = DistributedPipeline(model, schedule="1f1b", chunks=3)
    output = pipe(x if rank == 0 else None)
    last = pipe.placement[-1]
    verdict = {"forward_ok": (output is None) if rank != last else
               bool((output - expected).abs().max() < 1e-12)}
    try:
        pipe.to("cuda:0")
        verdict["to"] = None
    except TypeError as error:
        verdict["to"] = str(error)
    try:
        DistributedPipeline(mlp(layers=2 * world), device="cuda:7")
        verdict["device"] = None
    except ValueError as error:
        verdict["device"] = str(error)
    before = {t.name for t in threading.enumerate() if t.name.startswith("pipesched-")}
    del pipe, output
    gc.collect()
    for thread in threading.enumerate():
        if thread.name.startswith("pipesched-"):
            thread.join(timeout=5)
    after = {t.name for t in threading.enumerate() if t.name.startswith("pipesched-")}
    verdict["threads_before"], verdict["threads_after"] = len(before), len(after)
    out["forward"] = verdict


def scenario_tokens(rank: int, world: int, out: dict) -> None:
    """CE with ignore_index on padded targets: micro-batches weighted by tokens on the last rank.

    Also: log_tasks=False emits no task or comm event, and a loss_normalizer
    that raises on the last rank fails the step on every rank (no hang).
    """
    import structlog.testing

    from pipesched.distributed import DistributedPipeline, RemoteStepError

    x, y = data(16)
    y[[0, 1, 2, 4, 5, 6, 7, 9]] = -100  # micro-batches of 4 hold 1, 0 (all padding), 3 and 4 tokens
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64))
    for schedule in ["gpipe", "1f1b", "interleaved-1f1b"]:
        model = mlp(layers=4 * world if schedule.startswith("interleaved") else 2 * world + 1)
        reference = copy.deepcopy(model)
        ref_loss = loss_fn(reference(x), y)
        ref_loss.backward()
        with DistributedPipeline(model, schedule=schedule, chunks=4, loss_fn=loss_fn, log_tasks=False) as pipe:
            with structlog.testing.capture_logs() as events:
                loss = pipe.step(x if rank == 0 else None, y)
            structlog.reset_defaults()  # leaving capture_logs marks structlog configured
            error = grad_error(pipe, reference)
            out[f"tokens:{schedule}"] = {
                "ok": abs(loss.item() - ref_loss.item()) < 1e-12 and error < 1e-12 and not events,
                "loss": loss.item(), "ref": ref_loss.item(), "grad_error": error, "events": len(events),
            }

    def broken(targets):
        raise RuntimeError("broken normaliser")

    with DistributedPipeline(mlp(layers=2 * world + 1), schedule="1f1b", chunks=4, loss_fn=loss_fn,
                             loss_normalizer=broken) as pipe:
        try:
            pipe.step(x, y)
            out["tokens:broken"] = {"raised": None}
        except RemoteStepError as error:
            out["tokens:broken"] = {"raised": "RemoteStepError", "message": str(error)}
        except RuntimeError as error:
            out["tokens:broken"] = {"raised": "RuntimeError", "message": str(error)}


def scenario_tuples_and_own_stages(rank: int, world: int, out: dict) -> None:
    """Tuple activations cross processes; each rank builds only its own stage."""
    from pipesched.distributed import DistributedPipeline

    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(8, 12), Split(), Merge(), nn.Tanh(), nn.Linear(12, 4)).double()
    balance = [2, 3] if world == 2 else [1, 1, 1, 2]
    starts = [sum(balance[:i]) for i in range(len(balance))]
    own = {rank: nn.Sequential(*list(full)[starts[rank]: starts[rank] + balance[rank]])}
    x, y = data(9)
    reference = copy.deepcopy(full)
    ref_loss = nn.CrossEntropyLoss()(reference(x), y)
    ref_loss.backward()
    with DistributedPipeline(own, num_stages=world, schedule="1f1b", chunks=3,
                             loss_fn=nn.CrossEntropyLoss()) as pipe:
        loss = pipe.step(x, y)
        ref = list(reference.parameters())[sum(len(list(m.parameters())) for m in list(full)[: starts[rank]]):]
        errors = [(p.grad - r.grad).abs().max().item() for p, r in zip(pipe.parameters(), ref)]
    out["tuples"] = {"ok": abs(loss.item() - ref_loss.item()) < 1e-12 and max(errors, default=0) < 1e-12,
                     "errors": errors}

    # mappings cross processes with their keys and type; loss_fn indexes the last one
    torch.manual_seed(0)
    layers = [nn.Linear(8, 12), ToFeatures(), FromFeatures(), LastMapping()]
    full = nn.Sequential(*(layers + [nn.Identity()] * (world - 2))).double()
    balance = [2, 2] if world == 2 else [2, 1, 1, 2]  # 4 processes: a dict and a Features cross too
    reference = copy.deepcopy(full)

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out["logits"], y)

    ref_loss = loss_fn(reference(x), y)
    ref_loss.backward()
    FromFeatures.seen.clear()
    with DistributedPipeline(full, balance=balance, schedule="1f1b", chunks=3,
                             loss_fn=loss_fn) as pipe:
        loss = pipe.step(x, y)
        error = grad_error(pipe, reference)
    out["mappings"] = {"ok": abs(loss.item() - ref_loss.item()) < 1e-12 and error < 1e-12,
                       "error": error, "seen": FromFeatures.seen}


def scenario_failure(rank: int, world: int, out: dict) -> None:
    """An exception on one rank surfaces on every rank; the next step works."""
    from pipesched.distributed import DistributedPipeline, RemoteStepError

    failing = FailOnce()
    layers = list(mlp(layers=2 * world + 1))
    layers.insert(3, failing)  # inside stage 1
    model = nn.Sequential(*layers)
    x, y = data(8)
    # checkpoint="never": the second call is a first-run forward (F1.1), never a recompute
    with DistributedPipeline(model, schedule="1f1b", chunks=4, checkpoint="never",
                             loss_fn=nn.CrossEntropyLoss()) as pipe:
        try:
            pipe.step(x, y)
            result = {"raised": None}
        except ValueError as error:
            result = {"raised": "ValueError", "message": str(error), "notes": getattr(error, "__notes__", [])}
        except RemoteStepError as error:
            result = {"raised": "RemoteStepError", "message": str(error)}
        failing.armed = False
        for p in pipe.parameters():
            p.grad = None
        reference = copy.deepcopy(model)
        nn.CrossEntropyLoss()(reference(x), y).backward()
        pipe.step(x, y)
        result["next_step_grad_error"] = grad_error(pipe, reference)
        result["holds_failing_layer"] = any(m is failing for m in pipe.modules())
    out["failure"] = result


def scenario_timeline(rank: int, world: int, out: dict, directory: str) -> None:
    import structlog

    from pipesched import configure_jsonl_logging
    from pipesched.distributed import DistributedPipeline

    log = configure_jsonl_logging(os.path.join(directory, f"timeline-rank{rank}.jsonl"))
    try:
        x, y = data(16)
        with DistributedPipeline(mlp(layers=2 * world + 1), schedule="1f1b", chunks=4,
                                 loss_fn=nn.CrossEntropyLoss(), gather_timeline=True) as pipe:
            pipe.step(x, y)
            out["timeline"] = {"ok": True, "tasks": len(pipe.last_report.tasks),
                               "offset": pipe.clock_offset, "comm": len(pipe.last_comm),
                               "peak_activation_bytes": pipe.last_report.peak_activation_bytes}
    finally:
        structlog.reset_defaults()
        log.close()


class Hang(nn.Module):
    """Sleeps far longer than the stall timeout on its first call: a stuck user module."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            import time

            time.sleep(self.seconds)
        return x


def scenario_stall(rank: int, world: int, out: dict) -> None:
    """A rank stuck in user code: every rank's watchdog says what it waits on."""
    from pipesched import StepStalled
    from pipesched.distributed import DistributedPipeline

    layers = list(mlp(layers=2 * world + 1))
    layers.insert(3, Hang(4.0))  # inside stage 1
    x, y = data(4)
    pipe = DistributedPipeline(nn.Sequential(*layers), schedule="1f1b", chunks=2, checkpoint="never",
                               loss_fn=nn.CrossEntropyLoss(), stall_timeout=0.5)
    try:
        pipe.step(x, y)
        out["stall"] = {"raised": None}
    except StepStalled as error:
        out["stall"] = {"raised": "StepStalled", "message": str(error)}


def _tied_error(pipe, reference: nn.Module, what: str) -> float:
    """Largest difference between this rank's parameters' ``what`` ("grad" or "data") and the reference's."""
    ref = dict(reference.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
    worst = 0.0
    for name, param in pipe.named_parameters():
        original = name.split(".", 2)[2]  # local_stages.<stage>.<layer>.<param>
        worst = max(worst, (getattr(param, what) - getattr(ref[original], what)).abs().max().item())
    return worst


def tied_schedules(world: int) -> list[tuple[str, int]]:
    """Every schedule on 2 processes; on 4, one per placement (plain, looped, V), split backwards in two."""
    from pipesched.plan.registry import schedules_for

    fits = schedules_for(world)
    return fits if world == 2 else [(n, s) for n, s in fits if n in ("1f1b", "interleaved-zb", "zb-v")]


def scenario_tied(rank: int, world: int, out: dict) -> None:
    """A GPT-like model whose embedding and head (and two blocks) share weights across processes,
    under every schedule: two SGD steps, gradients and updated weights equal the plain model's on
    every rank. Ranks other than 0 start with a *different* tied value (as with another seed):
    building the pipeline must make every copy rank 0's."""
    from pipesched.distributed import DistributedPipeline
    from tied_models import gpt_balance, gpt_like, token_loss, tokens

    batches = [tokens(seed=2), tokens(seed=5)]
    for schedule, stages in tied_schedules(world):
        layers = stages + 2
        model = gpt_like(layers)
        reference = copy.deepcopy(model)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
        with torch.no_grad():
            model[0].weight.add_(rank)  # the head on another rank must not train this copy
        worst, losses = 0.0, []
        with DistributedPipeline(model, schedule=schedule, balance=gpt_balance(layers, stages), chunks=3,
                                 loss_fn=token_loss) as pipe:
            optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5)
            for x, y in batches:
                ref_opt.zero_grad()
                ref_loss = token_loss(reference(x), y)
                ref_loss.backward()
                optimizer.zero_grad()
                losses.append(abs(pipe.step(x, y).item() - ref_loss.item()))
                worst = max(worst, _tied_error(pipe, reference, "grad"))
                ref_opt.step()
                optimizer.step()
            weights = _tied_error(pipe, reference, "data")
            holds = {"embedding": any(p is model[0].weight for p in pipe.parameters()),
                     "block": any(p is model[1].up.weight for p in pipe.parameters())}
        out[f"tied:{schedule}"] = {
            "ok": worst < 1e-12 and weights < 1e-12 and max(losses) < 1e-12,
            "grad_error": worst, "weight_error": weights, "loss_error": max(losses), "holds": holds,
        }
    # a buffer shared across processes is still refused, naming it and the fix
    torch.manual_seed(0)
    first, second = nn.BatchNorm1d(8, dtype=torch.float64), nn.BatchNorm1d(8, dtype=torch.float64)
    second.running_mean = first.running_mean  # (after any .double(), which would untie buffers)
    shared = nn.Sequential(first, *[nn.Tanh() for _ in range(2 * world - 2)], second)
    try:
        DistributedPipeline(shared, schedule="1f1b", loss_fn=nn.CrossEntropyLoss())
        out["tied:buffer"] = None
    except ValueError as error:
        out["tied:buffer"] = str(error)


def scenario_clip(rank: int, world: int, out: dict) -> None:
    """pipe.clip_grad_norm_ clips by the whole model's norm on every rank (a tied weight counted once):
    the norm, the clipped gradients and the updated weights equal clip_grad_norm_ of the plain model."""
    from pipesched.distributed import DistributedPipeline
    from tied_models import gpt_balance, gpt_like, token_loss, tokens

    schedule, stages = ("zb-v", 2 * world)
    layers = stages + 2
    for norm_type in (2.0, float("inf")):
        model = gpt_like(layers)
        reference = copy.deepcopy(model)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
        norms, grads, weights = [], 0.0, 0.0
        with DistributedPipeline(model, schedule=schedule, balance=gpt_balance(layers, stages), chunks=3,
                                 loss_fn=token_loss) as pipe:
            optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5)
            for x, y in [tokens(seed=2), tokens(seed=5)]:
                ref_opt.zero_grad()
                token_loss(reference(x), y).backward()
                expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05, norm_type)
                optimizer.zero_grad()
                pipe.step(x, y)
                got = pipe.clip_grad_norm_(0.05, norm_type)
                norms.append(abs(float(got) - float(expected)) / float(expected))
                grads = max(grads, _tied_error(pipe, reference, "grad"))
                ref_opt.step()
                optimizer.step()
            weights = _tied_error(pipe, reference, "data")
        out[f"clip:{norm_type}"] = {"ok": max(norms) < 1e-12 and grads < 1e-12 and weights < 1e-12,
                                    "norm_error": max(norms), "grad_error": grads, "weight_error": weights}


def scenario_data_parallel(rank: int, world: int, out: dict) -> None:
    """Two pipelines of two processes (world 4), each fed half the batch, joined by data-parallel groups:
    loss, gradients and two SGD steps equal the plain model's on the whole batch, though the halves
    count different numbers of tokens and replica 1 starts from other weights; a step that fails on
    one replica fails on every process, changes no gradient, and the next step works."""
    if world != 4:
        return
    from pipesched.distributed import DistributedPipeline, RemoteStepError

    pipelines = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every process creates every group, in order
    replicas = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    replica = rank // 2
    model = mlp(layers=5)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(replica)  # another seed: building the pipelines must make replica 1 replica 0
    x, y = data(16)
    y[[9, 10, 12, 13, 15]] = -100  # padding in the second half only: 8 tokens against 3
    halves = (slice(0, 8), slice(8, 16))
    loss_fn = nn.CrossEntropyLoss()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    losses, grads = [], []
    with DistributedPipeline(model, schedule="1f1b", chunks=4, loss_fn=loss_fn, group=pipelines[replica],
                             data_parallel_group=replicas[rank % 2]) as pipe:
        optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5)
        first = pipe.rank == 0
        for _ in range(2):
            ref_opt.zero_grad()
            ref_loss = loss_fn(reference(x), y)
            ref_loss.backward()
            optimizer.zero_grad()
            mine = halves[replica]
            loss = pipe.step(x[mine] if first else None, y[mine])
            losses.append(abs(loss.item() - ref_loss.item()))
            grads.append(grad_error(pipe, reference))
            ref_opt.step()
            optimizer.step()
        weights = _tied_error(pipe, reference, "data")
        # replica 1's targets do not match its inputs: its last rank refuses them
        before = [p.grad.clone() for p in pipe.parameters()]
        bad = y[halves[replica]] if replica == 0 else y[:3]
        try:
            pipe.step(x[halves[replica]] if first else None, bad)
            raised = None
        except RemoteStepError as error:
            raised = f"RemoteStepError: {error}"
        except ValueError as error:
            raised = f"ValueError: {error}"
        unchanged = all(torch.equal(a, b.grad) for a, b in zip(before, pipe.parameters()))
        optimizer.zero_grad()
        after = abs(pipe.step(x[halves[replica]] if first else None, y[halves[replica]]).item()
                    - loss_fn(reference(x), y).item())
    out["data_parallel"] = {
        "ok": max(losses) < 1e-12 and max(grads) < 1e-12 and weights < 1e-12,
        "loss_error": max(losses), "grad_error": max(grads), "weight_error": weights,
        "raised": raised, "unchanged": unchanged, "next_loss_error": after,
    }


def scenario_pipeline_replicas(rank: int, world: int, out: dict) -> None:
    """One single-process Pipeline (2 ranks, threads) per process, joined by data_parallel_group:
    loss, parameter gradients, the inputs' gradients and two SGD steps equal the plain model on the
    whole batch, though the processes' parts count different numbers of tokens; a step that fails in
    one process fails in all and changes nothing; the next one is exact."""
    from pipesched import Pipeline
    from pipesched.distributed import RemoteStepError

    model = mlp(layers=5)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(rank)  # another seed: the pipeline must start from process 0's weights
    x, y = data(6 * world)
    y[[r * 6 + k for r in range(1, world) for k in range(r % 3 + 1)]] = -100  # unequal tokens per process
    mine = slice(6 * rank, 6 * rank + 6)
    loss_fn = nn.CrossEntropyLoss()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    losses, grads, inputs = [], [], []
    with Pipeline(model, schedule="1f1b", balance=[3, 2], devices=["cpu", "cpu"], chunks=3, loss_fn=loss_fn,
                  data_parallel_group=dist.group.WORLD) as pipe:
        optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5)
        for _ in range(2):
            ref_x = x.clone().requires_grad_(True)
            ref_opt.zero_grad()
            ref_loss = loss_fn(reference(ref_x), y)
            ref_loss.backward()
            optimizer.zero_grad()
            part = x[mine].clone().requires_grad_(True)
            loss = pipe.step(part, y[mine])
            losses.append(abs(loss.item() - ref_loss.item()))
            grads.append(max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(),
                                                                                  reference.parameters())))
            inputs.append((part.grad - ref_x.grad[mine]).abs().max().item())
            ref_opt.step()
            optimizer.step()
        weights = max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        before = [p.grad.clone() for p in model.parameters()]
        try:
            pipe.step(x[mine], y[mine] if rank else y[:2])  # process 0's targets do not match its inputs
            raised = None
        except (RemoteStepError, ValueError) as error:
            raised = f"{type(error).__name__}: {error}"
        unchanged = all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
        optimizer.zero_grad()
        after = abs(pipe.step(x[mine], y[mine]).item() - loss_fn(reference(x), y).item())
    # batch-norm statistics follow the first replica after every step, though each saw its own data
    torch.manual_seed(0)
    normed = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)).double()
    with Pipeline(normed, balance=[2, 1], devices=["cpu", "cpu"], chunks=2, loss_fn=loss_fn,
                  data_parallel_group=dist.group.WORLD) as pipe:
        pipe.step(x[mine] * (rank + 1), y[mine].clamp(min=0))
    stats = torch.cat([normed[1].running_mean, normed[1].running_var])
    every = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(every, stats)
    out["pipeline_replicas"] = {
        "buffers_equal": all(torch.equal(every[0], other) for other in every),
        "buffers_moved": bool((every[0] != torch.cat([torch.zeros(8), torch.ones(8)]).double()).any()),
        "ok": max(losses) < 1e-12 and max(grads) < 1e-12 and max(inputs) < 1e-12 and weights < 1e-12,
        "loss_error": max(losses), "grad_error": max(grads), "input_grad_error": max(inputs),
        "weight_error": weights, "raised": raised, "unchanged": unchanged, "next_loss_error": after,
    }


class _InfWeightGrad(torch.autograd.Function):
    """y = x + 0 * w; while armed, w's gradient is inf and x's stays finite (only this rank sees inf)."""

    @staticmethod
    def forward(ctx, x, w, armed):  # type: ignore[no-untyped-def]
        ctx.armed = armed
        return x + 0.0 * w.sum()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        w_grad = torch.full((1,), float("inf") if ctx.armed else 0.0, dtype=grad.dtype)
        return grad, w_grad, None


class InfOnArm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.armed = False

    def forward(self, x):
        return _InfWeightGrad.apply(x, self.w, self.armed)


def scenario_scaler(rank: int, world: int, out: dict) -> None:
    """One GradScaler per process: an inf in the last rank's gradients only must make every process's
    scaler skip that step and back off, as the plain model's one scaler does; three steps then give
    the plain model's weights and scale."""
    from pipesched.distributed import DistributedPipeline

    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.Tanh()] + [m for _ in range(world - 1) for m in (nn.Linear(16, 16), nn.Tanh())]
    model = nn.Sequential(*layers, InfOnArm(), nn.Linear(16, 4)).double()
    reference = copy.deepcopy(model)
    x, y = data(12)
    loss_fn = nn.CrossEntropyLoss()
    ours = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.2)
    scales = []
    with DistributedPipeline(model, schedule="1f1b", chunks=3, loss_fn=loss_fn) as pipe:
        optimizer = torch.optim.SGD(pipe.parameters(), lr=0.2)
        for step in range(3):
            armed = step == 1
            reference[-2].armed = armed
            for module in pipe.modules():
                if isinstance(module, InfOnArm):
                    module.armed = armed
            ref_opt.zero_grad()
            theirs.scale(loss_fn(reference(x), y)).backward()
            theirs.step(ref_opt)
            theirs.update()
            optimizer.zero_grad()
            pipe.step(x if rank == 0 else None, y, scaler=ours)
            ours.step(optimizer)
            ours.update()
            scales.append((ours.get_scale(), theirs.get_scale()))
        weights = _tied_error(pipe, reference, "data")
    out["scaler"] = {"ok": all(a == b for a, b in scales) and weights < 1e-12, "scales": scales,
                     "weight_error": weights}


def scenario_device(rank: int, world: int, out: dict) -> None:
    """Every process's ranks on ``PIPESCHED_TEST_DEVICE`` (``cuda:0`` in tests/test_distributed_cuda.py):
    gradients of 1F1B and ZB-V, float64, against the plain model on the same device; one float16
    step with a GradScaler per process; and single-process Pipelines on the device, data parallel
    across the processes. Messages and gradients are staged through host memory (gloo)."""
    from pipesched.distributed import DistributedPipeline

    device = torch.device(os.environ.get("PIPESCHED_TEST_DEVICE", "cpu"))
    verdicts = {}
    for schedule, stages in (("1f1b", world), ("zb-v", 2 * world)):
        model = mlp(layers=2 * stages)
        reference = copy.deepcopy(model).to(device)
        x, y = data(12)
        x, y = x.to(device), y.to(device)
        nn.CrossEntropyLoss()(reference(x), y).backward()
        with DistributedPipeline(model, schedule=schedule, chunks=4, checkpoint="except_last", device=device,
                                 loss_fn=nn.CrossEntropyLoss()) as pipe:
            loss = pipe.step(x if rank == 0 else None, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            error = grad_error(pipe, reference)
            on_device = all(p.device == device and p.grad.device == device for p in pipe.parameters())
        verdicts[schedule] = {"ok": error < 1e-10 and on_device and math.isfinite(loss.item()),
                              "grad_error": error, "on_device": on_device}
    model = mlp(layers=2 * world).float()
    with DistributedPipeline(model, schedule="1f1b", chunks=4, device=device, loss_fn=nn.CrossEntropyLoss()) as pipe:
        scaler = torch.amp.GradScaler(device.type)
        optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1)
        x, y = data(12)
        with torch.autocast(device.type, dtype=torch.float16):
            loss = pipe.step(x.float().to(device) if rank == 0 else None, y.to(device), scaler=scaler)
        scaler.step(optimizer)
        scaler.update()
        verdicts["float16-scaler"] = {"ok": math.isfinite(loss.item()) and scaler.get_scale() > 0,
                                      "loss": loss.item(), "scale": scaler.get_scale()}
    # one single-process Pipeline per process, its two ranks on the device, data parallel across processes
    from pipesched import Pipeline

    model = mlp(layers=5)
    reference = copy.deepcopy(model).to(device)
    x, y = data(8 * world)
    x, y = x.to(device), y.to(device)
    nn.CrossEntropyLoss()(reference(x), y).backward()
    mine = slice(8 * rank, 8 * rank + 8)
    with Pipeline(model, schedule="zb-h1", balance=[3, 2], devices=[device, device], chunks=4,
                  loss_fn=nn.CrossEntropyLoss(), data_parallel_group=dist.group.WORLD) as pipe:
        pipe.step(x[mine], y[mine])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    error = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
    verdicts["pipeline-replicas"] = {"ok": error < 1e-10, "grad_error": error}
    out["device"] = verdicts


class ExitProcess(nn.Module):
    """While armed, ends its process abruptly (no clean-up, sockets closed by the OS)."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            os._exit(17)
        return x


def _lost_peer_step(pipe, x, y) -> dict:
    """Run the step that loses a peer; say what it raised, how fast, and what the next step says."""
    import time

    from pipesched.distributed import PeerLost

    began = time.monotonic()
    try:
        pipe.step(x, y)
        result = {"raised": None}
    except PeerLost as error:
        result = {"raised": "PeerLost", "message": str(error)}
    except BaseException as error:  # noqa: BLE001 - the test reads what it was
        result = {"raised": type(error).__name__, "message": str(error)}
    result["seconds"] = time.monotonic() - began
    try:
        pipe.step(x, y)
        result["next"] = None
    except RuntimeError as error:
        result["next"] = str(error)
    return result


def scenario_peer_exits(rank: int, world: int, out: dict) -> None:
    """Rank 1's process exits mid-step (os._exit): rank 0 must raise promptly, not wait for gloo."""
    from pipesched.distributed import DistributedPipeline

    exiting = ExitProcess()
    layers = list(mlp(layers=2 * world + 1))
    layers.insert(3, exiting)  # inside stage 1
    x, y = data(8)
    with DistributedPipeline(nn.Sequential(*layers), schedule="1f1b", chunks=4, checkpoint="never",
                             loss_fn=nn.CrossEntropyLoss(), stall_timeout=5.0) as pipe:
        pipe.step(x, y)  # a healthy step first
        exiting.armed = True
        out["peer_exits"] = _lost_peer_step(pipe, x, y)


class Freeze(nn.Module):
    """While armed, blocks far longer than any test: a rank stuck in user code, its process alive."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            import time

            time.sleep(600)
        return x


def scenario_peer_freezes(rank: int, world: int, out: dict) -> None:
    """Rank 0 fails while rank 1 is stuck: waiting for what rank 1 still owes ends at stall_timeout."""
    from pipesched.distributed import DistributedPipeline

    failing, frozen = FailOnce(), Freeze()
    failing.armed = False
    layers = list(mlp(layers=2 * world + 1))
    layers.insert(3, frozen)  # inside stage 1
    layers.insert(1, failing)  # inside stage 0: raises in F0.1, after F0.0 reached rank 1
    x, y = data(8)
    pipe = DistributedPipeline(nn.Sequential(*layers), schedule="1f1b", chunks=4, checkpoint="never",
                               loss_fn=nn.CrossEntropyLoss(), stall_timeout=2.0)
    pipe.step(x, y)  # a healthy step first
    failing.armed, failing.calls, frozen.armed = True, 0, True  # F0.0 passes, F0.1 raises
    if rank == 0:
        out["peer_freezes"] = _lost_peer_step(pipe, x, y)
    else:  # stuck in F1.0; stays alive (and silent) until the test kills it
        try:
            pipe.step(x, y)
        except BaseException:  # noqa: BLE001 - its own watchdog; keep the process alive regardless
            pass
        import time

        time.sleep(600)


class Widen(nn.Module):
    """Appends ``extra`` zero columns: an output shape that changes while the input's does not."""

    def __init__(self):
        super().__init__()
        self.extra = 0

    def forward(self, x):
        return torch.cat([x, x.new_zeros(*x.shape[:-1], self.extra)], dim=-1)


class Narrow(nn.Module):
    def forward(self, x):
        return x[..., :16]


def scenario_shapes(rank: int, world: int, out: dict) -> None:
    """Shapes cross once per (edge, micro-batch shape); a new batch size, a new trailing shape
    and a data-dependent output shape each re-negotiate, and every step stays exact."""
    from pipesched.distributed import DistributedPipeline

    widen = Widen()
    layers = list(mlp(layers=2 * world + 1))
    layers[1:1] = [widen, Narrow()]  # stage 0 ends widened, stage 1 starts narrowing (balance below)
    model = nn.Sequential(*layers)
    balance = [2] + [1] * (world - 2) + [len(layers) - 2 - (world - 2)]
    steps = [  # (rows, sequence length or None, extra columns)
        (8, None, 0), (8, None, 0), (12, None, 0), (8, None, 0), (8, 3, 0), (8, 5, 0), (8, 5, 0),
        (8, None, 2), (8, None, 2), (8, None, 0),
    ]
    verdicts = []
    with DistributedPipeline(model, schedule="1f1b", balance=balance, chunks=4, checkpoint="never",
                             loss_fn=lambda o, y: nn.functional.cross_entropy(o.reshape(-1, 4), y.reshape(-1))
                             ) as pipe:
        for rows, sequence, extra in steps:
            x, y = data(rows * (sequence or 1))
            if sequence:
                x, y = x.reshape(rows, sequence, 8), y.reshape(rows, sequence)
            widen.extra = extra
            reference = copy.deepcopy(model)
            ref_loss = nn.functional.cross_entropy(reference(x).reshape(-1, 4), y.reshape(-1))
            ref_loss.backward()
            for p in pipe.parameters():
                p.grad = None
            before = (pipe._comm.specs_sent, pipe._comm.respecs_sent)
            loss = pipe.step(x, y)
            verdicts.append({
                "exact": abs(loss.item() - ref_loss.item()) < 1e-12 and grad_error(pipe, reference) < 1e-12,
                "specs": pipe._comm.specs_sent - before[0], "respecs": pipe._comm.respecs_sent - before[1],
            })
    out["shapes"] = verdicts


def scenario_state_dict(rank: int, world: int, out: dict) -> None:
    """Each rank's state dict is its part of the model's, under the model's keys; the model's
    full state dict loads into every rank, which takes its own layers from it."""
    from pipesched.distributed import DistributedPipeline

    model = mlp(layers=2 * world + 1)
    source = copy.deepcopy(model)
    with torch.no_grad():
        for param in source.parameters():
            param.mul_(0.5).add_(0.1)
    full = source.state_dict()
    x, y = data(9)
    with DistributedPipeline(model, schedule="1f1b", chunks=3, loss_fn=nn.CrossEntropyLoss()) as pipe:
        layers = {name for stage in pipe.local_stages.values() for name in stage._modules}
        own_keys = [k for k in full if k.split(".")[0] in layers]
        keys = list(pipe.state_dict())
        pipe.load_state_dict(full)  # strict; other ranks' layers ignored
        loaded = all(torch.equal(value, full[key]) for key, value in pipe.state_dict().items())
        pipe.load_state_dict(pipe.state_dict())  # this rank's partial state dict, strict
        errors = {}
        for name, bad in [("missing", {k: v for k, v in full.items() if k != own_keys[0]}),
                          ("unexpected", {**full, "99.weight": torch.zeros(1)})]:
            try:
                pipe.load_state_dict(bad)
                errors[name] = None
            except RuntimeError as error:
                errors[name] = str(error)
        reference = copy.deepcopy(source)
        nn.CrossEntropyLoss()(reference(x), y).backward()
        pipe.step(x if rank == 0 else None, y)
        out["state_dict"] = {
            "keys": keys, "own_keys": own_keys, "model_keys": list(full), "loaded": loaded,
            "missing": errors["missing"] is not None and f'"{own_keys[0]}"' in errors["missing"],
            "unexpected": errors["unexpected"] is not None and '"99.weight"' in errors["unexpected"],
            "grad_error": grad_error(pipe, reference),
        }


def scenario_skips(rank: int, world: int, out: dict) -> None:
    """A U-Net whose skips cross 1, 2 and 3 stages (tests/skip_models.py), 4 stages on 2 or 4 processes."""
    from skip_models import UNET_BALANCE, unet, unet_data

    from pipesched.distributed import DistributedPipeline
    from pipesched.plan.lowering import SKIP

    shapes = {2: [("zb-v", "always"), ("interleaved-1f1b", "except_last")],
              4: [("1f1b", "always"), ("zb-h1", "except_last")]}[world]
    for schedule, policy in shapes:
        model = unet()
        x, y = unet_data(rows=7)
        reference = copy.deepcopy(model)
        ref_loss = nn.MSELoss()(reference(x), y)
        ref_loss.backward()
        with DistributedPipeline(model, schedule=schedule, balance=UNET_BALANCE, chunks=3, checkpoint=policy,
                                 loss_fn=nn.MSELoss(), stall_timeout=60) as pipe:
            loss = pipe.step(x if rank == 0 else None, y)
            _, lowering = pipe._runner.plan(3)
            crossing = [t for t in lowering.transfers if t.carries == SKIP and t.src == rank and t.dst != rank]
            sent = [c for c in pipe.last_comm if c.kind == "send" and c.action.startswith("S")]
            error = grad_error(pipe, reference)
            out[f"skips:{schedule}"] = {
                "ok": abs(loss.item() - ref_loss.item()) < 1e-12 and error < 1e-12,
                "loss": loss.item(), "ref": ref_loss.item(), "grad_error": error,
                "skip_sends": len(sent), "expected_skip_sends": len(crossing),
                "peers": sorted({c.peer for c in sent}), "expected_peers": sorted({t.dst for t in crossing}),
            }
    placement = {2: [0, 1, 1, 0], 4: [0, 1, 2, 3]}[world]
    stages = dict(enumerate(Pipeline_stages(unet(), UNET_BALANCE)))
    try:
        DistributedPipeline({s: m for s, m in stages.items() if placement[s] == rank}, num_stages=4,
                            schedule="zb-v" if world == 2 else "1f1b", loss_fn=nn.MSELoss())
        out["skips:dict"] = "accepted"
    except ValueError as error:
        out["skips:dict"] = str(error)


def scenario_auto(rank: int, world: int, out: dict) -> None:
    """schedule="auto" without costs: step 1 runs the warm-up plan and measures; every rank then
    holds every stage's medians (merged from all processes) and runs the same synthesised plan."""
    from pipesched.distributed import DistributedPipeline

    model = mlp(layers=2 * world)
    x, y = data(16)
    reference = copy.deepcopy(model)
    nn.CrossEntropyLoss()(reference(x), y).backward()
    with DistributedPipeline(model, schedule="auto", chunks=8, checkpoint="never",
                             loss_fn=nn.CrossEntropyLoss()) as pipe:
        plans, errors, ran = [], [], []
        for _ in range(3):
            for p in pipe.parameters():
                p.grad = None
            pipe.step(x if rank == 0 else None, y)
            report = pipe.last_report
            plans.append(report.plan)
            errors.append(grad_error(pipe, reference))
            own = sorted((t for t in report.tasks if t.rank == rank), key=lambda t: t.start)
            ran.append([f"{t.kind}{t.stage}.{t.microbatch}" for t in own])
        synthesis = pipe.schedule.synthesis.get(8)
        out["auto"] = {
            "plans": plans, "grad_errors": errors, "ran": ran, "num_stages": pipe.num_stages,
            "measured": sorted([kind, stage, seconds] for (kind, stage), seconds in (pipe.schedule.measured or {}).items()),
            "synthesised_row": None if synthesis is None else [str(a) for a in synthesis.plan[rank]],
        }


def Pipeline_stages(model: nn.Sequential, balance: list[int]) -> list[nn.Module]:  # noqa: N802
    from pipesched.runtime.partition import split_module

    return split_module(model, balance)


SCENARIOS = {
    "skips": scenario_skips,
    "gradients": scenario_gradients,
    "forward": scenario_forward_and_placement,
    "tuples": scenario_tuples_and_own_stages,
    "tokens": scenario_tokens,
    "failure": scenario_failure,
    "tied": scenario_tied,
    "auto": scenario_auto,
    "clip": scenario_clip,
    "data_parallel": scenario_data_parallel,
    "pipeline_replicas": scenario_pipeline_replicas,
    "scaler": scenario_scaler,
    "device": scenario_device,


    "state_dict": scenario_state_dict,
    "shapes": scenario_shapes,
    "stall": scenario_stall,
    "peer_exits": scenario_peer_exits,
    "peer_freezes": scenario_peer_freezes,
}
#: scenarios after which the process group cannot be left cleanly
LEAVE_ABRUPTLY = {"stall", "peer_exits", "peer_freezes"}


def run_scenarios(rank: int, world: int, port: int, names: list[str], directory: str,
                  run: Callable[[str, dict], None], isolate: bool = False, leave_abruptly: bool = False) -> None:
    """One process of a gloo world on 127.0.0.1: ``run(name, out)`` for each name in order, then the verdicts
    ``out`` go to ``directory/rank{rank}.json`` for the test to read.

    ``isolate``: a scenario's exception is recorded as ``out["<name>:crash"]`` and the next one still
    runs (one failure must not hide the others'); otherwise the first one ends the process, recorded
    as ``out["crash"]``. ``leave_abruptly``: a scenario left a rank stuck or gone, so the process
    exits without leaving the group.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out: dict = {}
    try:
        for name in names:
            try:
                run(name, out)
            except Exception:  # noqa: BLE001 - reported to the test through the file
                if not isolate:
                    raise
                out[f"{name}:crash"] = traceback.format_exc()
    except BaseException:  # noqa: BLE001 - reported to the test through the file
        out["crash"] = traceback.format_exc()
    finally:
        with open(os.path.join(directory, f"rank{rank}.json"), "w") as file:
            json.dump(out, file)
        if leave_abruptly:
            os._exit(0)
        dist.destroy_process_group()


def entry(rank: int, world: int, port: int, names: list[str], directory: str) -> None:
    """Process entry point: run the named scenarios in order, write the verdicts."""

    def run(name: str, out: dict) -> None:
        if name == "timeline":
            scenario_timeline(rank, world, out, directory)
        else:
            SCENARIOS[name](rank, world, out)

    run_scenarios(rank, world, port, names, directory, run, leave_abruptly=bool(LEAVE_ABRUPTLY & set(names)))
