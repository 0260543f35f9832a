"""Item 2: gradients on the device equal the un-pipelined model's on the same device.

Every schedule that fits p ranks (``schedules_for``), every checkpoint policy,
all ranks on the one device. The references are plain torch on the same
device, never something the pipeline computed:

* ``float64``: an MLP, against one backward of the whole batch; max |Δ| ≤ 1e-10.
* ``dropout``: the MLP with dropout in every stage, float64, against the
  docs' oracle (docs/guide/checkpointing.md): the plain layers run one micro-batch at a time, each
  stage's forward seeded ``forward_seed(step_seed, stage, micro-batch)``;
  max |Δ| ≤ 1e-10. This is the CUDA RNG replay of checkpointed forwards.
* ``float32``: convolutions + GroupNorm (no batch norm: its statistics depend
  on the micro-batch), TF32 off; max |Δ| ≤ 1e-4 × max |reference| per tensor.
* ``bf16``: a small GPT-like model under ``torch.autocast(dtype=bfloat16)``
  against the same model under autocast on the whole batch; max |Δ| ≤
  2e-2 × max |reference| per tensor (each micro-batch's weight gradient is
  rounded to bf16 once before the fp32 sum). The bf16 reference's own
  distance to float32 is reported beside it for scale.
* ``fp16-scaler``: the GPT-like model under ``torch.autocast(dtype=float16)``
  with ``pipe.step(x, y, scaler=GradScaler(init_scale=2**12))`` against
  ``(loss * 2**12).backward()`` of the model under the same autocast on the
  whole batch: the scaled gradients, compared as for bf16 (max |Δ| ≤ 1e-2 ×
  max |reference| per tensor).
* ``busy-stream``: float64, the caller's stream busy with a long kernel,
  then the input's last write, then ``step()`` with no synchronisation, and
  the gradients read on the caller's stream right after: they must be the
  finished ones.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.gpu.budget import ItemBudget
from benchmarks.gpu.env import Env
from benchmarks.gpu.models import gpt
from benchmarks.gpu.results import ItemResult, Results
from pipesched import Pipeline
from pipesched.plan.registry import schedules_for
from pipesched.runtime.microbatch import split_sizes
from pipesched.runtime.partition import even_balance
from pipesched.runtime.rng import draw_step_seed, forward_seed

NAME = "gradients"
TITLE = "2. Gradients on the device vs the un-pipelined model on the same device"
COLUMNS = [("variant", "variant"), ("p", "p"), ("m", "m"), ("schedule", "schedule"), ("policy", "checkpoint"),
           ("max_abs_diff", "max abs diff"), ("tolerance", "tolerance"), ("ok", "equal"), ("seconds", "s")]
OPTIONS = ("corrupt_gradient",)
POLICIES: dict[str, Any] = {"never": "never", "always": "always", "except_last": "except_last",
                            "alternate": lambda stage, microbatch: (stage + microbatch) % 2 == 0}


@dataclass
class Case:
    variant: str
    p: int
    schedule: str
    stages: int
    policy: str


@dataclass
class Workload:
    """A model template, a batch, a loss, and how to compare."""

    model: nn.Sequential
    x: Tensor
    y: Tensor
    loss_fn: nn.Module
    autocast: torch.dtype | None
    relative: bool  # tolerance relative to max |reference| per tensor
    tolerance: float
    reference: Callable[[int, int], list[Tensor]]  # (stages, chunks) -> gradients
    note: str = ""
    loss_scale: float | None = None  # step with a GradScaler of this initial scale


def _mlp(width: int, layers: int, dropout: float, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(8 if i == 0 else width, width), nn.Tanh()]
        if dropout:
            mods.append(nn.Dropout(dropout))
    mods.append(nn.Linear(width, 4))
    return nn.Sequential(*mods).double().to(device)


def _conv(width: int, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
    for _ in range(5):
        mods += [nn.GroupNorm(4, width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4)]
    return nn.Sequential(*mods).to(device)


def _whole_batch(model: nn.Sequential, x: Tensor, y: Tensor, loss_fn: nn.Module, env: Env,
                 autocast: torch.dtype | None = None, scale: float = 1.0) -> list[Tensor]:
    ref = copy.deepcopy(model)
    with env.autocast(autocast):
        loss = loss_fn(ref(x), y)
    (loss * scale).backward()
    return [p.grad.detach().clone() for p in ref.parameters()]


def _dropout_oracle(model: nn.Sequential, x: Tensor, y: Tensor, stages: int, chunks: int,
                    caller_seed: int) -> list[Tensor]:
    """Plain torch, one micro-batch at a time, each stage seeded by the documented rule."""
    ref = copy.deepcopy(model)
    torch.manual_seed(caller_seed)
    step_seed = draw_step_seed()
    balance = even_balance(len(ref), stages)
    bounds = [sum(balance[:i]) for i in range(stages + 1)]
    layers = list(ref)
    sizes = split_sizes(x.shape[0], chunks)
    for m, (xm, ym) in enumerate(zip(torch.split(x, sizes), torch.split(y, sizes))):
        h = xm
        for s in range(stages):
            torch.manual_seed(forward_seed(step_seed, s, m))
            for layer in layers[bounds[s]:bounds[s + 1]]:
                h = layer(h)
        (nn.functional.mse_loss(h, ym) * (xm.shape[0] / x.shape[0])).backward()
    return [p.grad.detach().clone() for p in ref.parameters()]


def workloads(env: Env) -> dict[str, Workload]:
    dev, dry = env.device, env.dry_run
    rows = 18  # uneven micro-batches for every m used here
    g = torch.Generator().manual_seed(0)
    x8 = torch.randn(rows, 8, dtype=torch.float64, generator=g).to(dev)
    classes = torch.randint(0, 4, (rows,), generator=g).to(dev)
    out: dict[str, Workload] = {}

    mlp = _mlp(16 if dry else 64, 6, 0.0, dev)
    ce = nn.CrossEntropyLoss()
    full64 = _whole_batch(mlp, x8, classes, ce, env)
    out["float64"] = Workload(mlp, x8, classes, ce, None, False, 1e-10, lambda s, m: full64)

    drop = _mlp(16 if dry else 64, 4, 0.3, dev)
    target = torch.randn(rows, 4, dtype=torch.float64, generator=g).to(dev)
    oracles: dict[tuple[int, int], list[Tensor]] = {}

    def dropout_reference(stages: int, chunks: int) -> list[Tensor]:
        if (stages, chunks) not in oracles:
            oracles[stages, chunks] = _dropout_oracle(drop, x8, target, stages, chunks, caller_seed=11)
        return oracles[stages, chunks]

    out["dropout"] = Workload(drop, x8, target, nn.MSELoss(), None, False, 1e-10, dropout_reference)

    conv = _conv(8 if dry else 32, dev)
    images = torch.randn(rows, 3, 8 if dry else 32, 8 if dry else 32, generator=g).to(dev)
    with _no_tf32():
        full32 = _whole_batch(conv, images, classes, ce, env)
    out["float32"] = Workload(conv, images, classes, ce, None, True, 1e-4, lambda s, m: full32)

    torch.manual_seed(0)
    seq, vocab = 16, 64
    lm = gpt(vocab=vocab, width=32 if dry else 128, heads=4, blocks=8, seq_len=seq).to(dev)
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=g).to(dev)
    ids, nxt = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    bf16 = _whole_batch(lm, ids, nxt, ce, env, torch.bfloat16)
    fp32 = _whole_batch(lm, ids, nxt, ce, env)
    out["bf16"] = Workload(lm, ids, nxt, ce, torch.bfloat16, True, 2e-2, lambda s, m: bf16,
                           note=f"bf16 reference vs float32 reference (max per-tensor |Δ| / max |ref|): "
                                f"{_max_relative(bf16, fp32):.2e}")
    scale = 2.0**12
    fp16 = _whole_batch(lm, ids, nxt, ce, env, torch.float16, scale)
    out["fp16-scaler"] = Workload(lm, ids, nxt, ce, torch.float16, True, 1e-2, lambda s, m: fp16, loss_scale=scale)
    return out


class _no_tf32:
    """TF32 off for matmuls and convolutions inside, restored after."""

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _max_relative(got: list[Tensor], want: list[Tensor]) -> float:
    return max(float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1e-30)
               for a, b in zip(got, want))


def distance(got: list[Tensor], want: list[Tensor], relative: bool) -> tuple[float, int]:
    """The largest per-tensor error (relative to that tensor's max |reference| if asked), and where."""
    worst, where = 0.0, -1
    for index, (a, b) in enumerate(zip(got, want)):
        diff = float((a.double() - b.double()).abs().max())
        if relative:
            diff /= max(float(b.double().abs().max()), 1e-30)
        if diff > worst or where < 0:
            worst, where = diff, index
    return worst, where


def cases(env: Env) -> Iterator[tuple[Case, bool]]:
    """(case, busy caller stream) in order of value; the dry run covers each kind once per schedule."""
    p_values = (2,) if env.dry_run else (2, 4)
    for p in p_values:
        fits = schedules_for(p)
        for schedule, stages in fits:
            for policy in POLICIES:
                yield Case("float64", p, schedule, stages, policy), False
        for schedule, stages in fits:
            yield Case("busy-stream", p, schedule, stages, "except_last"), True
        for schedule, stages in fits:
            for policy in (POLICIES if p == 2 else ("always",)):
                if env.dry_run and policy not in ("always", "alternate"):
                    continue
                yield Case("dropout", p, schedule, stages, policy), False
        for schedule, stages in fits:
            if env.dry_run and schedule not in ("gpipe", "zb-v"):
                continue
            for policy in ("never", "always"):
                if env.dry_run and policy != "always":
                    continue
                yield Case("float32", p, schedule, stages, policy), False
                yield Case("bf16", p, schedule, stages, policy), False
                yield Case("fp16-scaler", p, schedule, stages, policy), False


def run_case(env: Env, work: Workload, case: Case, busy: bool) -> tuple[list[Tensor], float]:
    """One pipeline step; returns the gradients (read on the caller's stream) and the loss."""
    model = copy.deepcopy(work.model)
    chunks = 4 if case.p == 2 else 8
    torch.manual_seed(11)
    with Pipeline(model, schedule=case.schedule, balance=even_balance(len(model), case.stages),
                  devices=[env.device] * case.p, chunks=chunks, checkpoint=POLICIES[case.policy],
                  loss_fn=work.loss_fn, stall_timeout=120.0) as pipe:
        if busy:
            x = torch.empty_like(work.x)
            env.busy_caller_stream(0.05)
            x.copy_(work.x)  # the input's last write waits behind the long kernel
        else:
            x = work.x
        scaler = None if work.loss_scale is None else torch.amp.GradScaler(env.device.type,
                                                                            init_scale=work.loss_scale)
        with env.autocast(work.autocast):
            loss = pipe.step(x, work.y, scaler=scaler)
        grads = [p.grad.detach().clone() if p.grad is not None else torch.full_like(p, float("nan"))
                 for p in model.parameters()]  # no synchronize: the caller's stream must see them done
    env.sync()
    return grads, float(loss)


def run(env: Env, results: Results, budget: ItemBudget, corrupt_gradient: bool = False) -> ItemResult:
    item = results.add_item(NAME, TITLE, COLUMNS)
    works = workloads(env)
    for work in works.values():
        if work.note:
            results.note(item, work.note)
    estimate = 2.0
    for case, busy in cases(env):
        label = f"{case.variant} p={case.p} {case.schedule} {case.policy}"
        if item.rows and not budget.fits(estimate):  # the first case runs whatever the budget
            results.skip(item, label, f"item budget ({budget.left():.0f} s left, ~{estimate:.1f} s needed)")
            continue
        work = works["float64" if case.variant == "busy-stream" else case.variant]
        chunks = 4 if case.p == 2 else 8
        try:
            with _no_tf32() if case.variant == "float32" else contextlib.nullcontext():
                seconds, (grads, _) = env.timed(run_case, env, work, case, busy)
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            results.fail(item, f"{label}: raised {type(error).__name__}: {error}")
            continue
        estimate = max(0.5, 2 * seconds)
        if corrupt_gradient and not item.rows:
            grads[0] = grads[0] + 1.0  # the failure path's own test (tests/test_gpu_script.py)
        diff, where = distance(grads, work.reference(case.stages, chunks), work.relative)
        ok = diff <= work.tolerance
        tolerance = f"{work.tolerance:g}{' × max abs ref' if work.relative else ''}"
        results.row(item, variant=case.variant, p=case.p, m=chunks, schedule=case.schedule, policy=case.policy,
                    max_abs_diff=diff, tolerance=tolerance, ok=ok, seconds=seconds)
        if not ok:
            results.fail(item, f"{label}: parameter {where} off by {diff:.3e} (tolerance {tolerance})")
    return item
