"""9. Split backward (issue #12): B (input gradients) then W (parameter gradients) vs one full backward.

Zero-bubble schedules split a stage's backward into B and W
(:mod:`pipesched.runtime.split_backward`). The split pays only if each half
does its own work: on a stage dominated by matrix products or convolutions,
B + W must cost about one full backward (a W that re-ran the backward would
cost 1.5x or more).

Workloads (CPU, one intra-op thread), each a middle stage (its input
requires grad, the output gradient is given):

* ``linear``: 8 x (``nn.Linear(1024, 1024)`` + GELU), 256 rows;
* ``conv``: 4 x (``nn.Conv2d(64, 64, 3, padding=1)`` + ReLU), input 8 x 64 x 32 x 32.

Contenders, in alternating rounds (order rotating): ``full`` =
``torch.autograd.backward(out, grad)``; ``split`` = ``backward_input`` then
``WeightWork.run()``, timed separately. Only the backward is timed: each
step runs its forward first, untimed, and starts from ``grad = None``.
Figures per round, then median [min..max]: B / full, W / full,
(B + W) / full. Target: (B + W) / full <= 1.10 on the linear stack.

Also reported: the bytes W keeps from B until it runs (``WeightWork.nbytes``:
each linear layer's input and its incoming gradient) over the bytes the
forward saved for the backward (counted by a saved-tensor hook), and whether
the split's gradients equal the full backward's (``torch.equal``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.config import RunConfig
from benchmarks.rounds import alternating_rounds
from benchmarks.stats import fmt, summary
from benchmarks.table import format_table
from benchmarks.targets import Target
from benchmarks.workloads import zero_grad
from pipesched.runtime.split_backward import backward_input

NAME = "split_backward"
TITLE = "9. Split backward: B then W vs one full backward (CPU, 1 thread)"
TARGET = 1.10


def _linear(cfg: RunConfig) -> tuple[nn.Module, Tensor, str]:
    layers, width, rows = cfg.pick(tiny=(2, 64, 8), quick=(4, 1024, 128), full=(8, 1024, 256))
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())])
    return model, torch.randn(rows, width), f"{layers} x (Linear({width}, {width}) + GELU), {rows} rows"


def _conv(cfg: RunConfig) -> tuple[nn.Module, Tensor, str]:
    layers, channels, batch, side = cfg.pick(tiny=(2, 4, 2, 8), quick=(4, 32, 8, 32), full=(4, 64, 8, 32))
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())])
    shape = (batch, channels, side, side)
    return model, torch.randn(*shape), f"{layers} x (Conv2d({channels}, {channels}, 3, padding=1) + ReLU), input {shape}"


def _saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes the forward saves for the backward (each storage once; parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.detach().requires_grad_())
    return sum(seen.values())


def _contenders(model: nn.Module, x: Tensor, record: dict[str, list[float]]) -> dict[str, Callable[[int], float]]:
    """``full`` and ``split``: each runs ``k`` steps (forward untimed, backward timed) and returns the seconds."""
    params = list(model.parameters())
    with torch.no_grad():
        grad = torch.randn_like(model(x))

    def full(k: int) -> float:
        total = 0.0
        for _ in range(k):
            zero_grad(model)
            xi = x.detach().requires_grad_()
            out = model(xi)
            start = time.perf_counter()
            torch.autograd.backward([out], [grad])
            total += time.perf_counter() - start
        return total

    def split(k: int) -> float:
        b_total = w_total = 0.0
        for _ in range(k):
            zero_grad(model)
            xi = x.detach().requires_grad_()
            out = model(xi)
            start = time.perf_counter()
            _, work = backward_input([out], [grad], [xi], params)
            middle = time.perf_counter()
            work.run()
            b_total += middle - start
            w_total += time.perf_counter() - middle
        record["B"].append(b_total / k)
        record["W"].append(w_total / k)
        return b_total + w_total

    return {"full": full, "split": split}


def _gradients_equal(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """One full backward and one split backward from zero: bitwise equal? (and the largest difference)."""
    params = list(model.parameters())
    xi = x.detach().requires_grad_()
    out = model(xi)
    grad = torch.randn_like(out)
    zero_grad(model)
    torch.autograd.backward([out], [grad])
    expected = [p.grad.clone() for p in params] + [xi.grad.clone()]
    zero_grad(model)
    xi = x.detach().requires_grad_()
    out = model(xi)
    (gx,), work = backward_input([out], [grad], [xi], params)
    kept = work.nbytes()
    work.run()
    got = [p.grad for p in params] + [gx]
    zero_grad(model)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    return {"equal": all(torch.equal(a, b) for a, b in zip(got, expected)), "max_abs_difference": diff,
            "w_kept_bytes": kept}


def run(cfg: RunConfig) -> dict[str, Any]:
    rounds = cfg.n_rounds(tiny=1, quick=5, full=15)
    steps = cfg.pick(tiny=1, quick=2, full=2)
    rows: list[dict[str, Any]] = []
    rounds_out: dict[str, Any] = {}
    workload: dict[str, str] = {}
    for name, make in (("linear", _linear), ("conv", _conv)):
        model, x, described = make(cfg)
        workload[name] = described
        record: dict[str, list[float]] = {"B": [], "W": []}
        contenders = _contenders(model, x, record)
        result = alternating_rounds(contenders, rounds=rounds, steps=steps, warmup=1)
        record = {k: v[-rounds:] for k, v in record.items()}  # drop the warm-up's
        full = result.per_step["full"]
        b_over = [b / f for b, f in zip(record["B"], full)]
        w_over = [w / f for w, f in zip(record["W"], full)]
        check = _gradients_equal(model, x)
        saved = _saved_bytes(model, x)
        rows.append({
            "workload": name,
            "full_s": summary(full),
            "b_s": summary(record["B"]),
            "w_s": summary(record["W"]),
            "b_over_full": summary(b_over),
            "w_over_full": summary(w_over),
            "b_plus_w_over_full": summary([b + w for b, w in zip(b_over, w_over)]),
            "forward_saved_bytes": saved,
            **check,
        })
        rounds_out[name] = {**result.as_dict(), "b_seconds_per_step": record["B"], "w_seconds_per_step": record["W"]}
        cfg.log(f"{name}: (B+W)/full {rows[-1]['b_plus_w_over_full']['median']:.3f}")

    table = format_table(
        ["workload", "full ms", "B ms", "W ms", "B/full", "W/full", "(B+W)/full", "W keeps MiB", "fwd saved MiB",
         "grads equal"],
        [[r["workload"], fmt(r["full_s"], 1, 1e3), fmt(r["b_s"], 1, 1e3), fmt(r["w_s"], 1, 1e3),
          fmt(r["b_over_full"]), fmt(r["w_over_full"]), fmt(r["b_plus_w_over_full"]),
          f"{r['w_kept_bytes'] / 2**20:.1f}", f"{r['forward_saved_bytes'] / 2**20:.1f}",
          "yes" if r["equal"] else f"NO ({r['max_abs_difference']:.1e})"]
         for r in rows],
        title=TITLE,
    )
    table += "".join(f"\n{name}: {text}" for name, text in workload.items())
    table += (
        f"\n{rounds} alternating rounds x {steps} steps, backward only (forward untimed), from grad = None; "
        "median [min..max] of per-round ratios."
        "\nW keeps: WeightWork.nbytes() after B (layer inputs + incoming gradients); fwd saved: what the forward "
        "saved for the backward. grads equal: split vs full, torch.equal on parameter and input gradients."
    )
    linear = rows[0]
    targets = [Target("linear stack (B+W)/full", float(linear["b_plus_w_over_full"]["median"]), TARGET,
                      higher_is_better=False,
                      note=f"B/full {float(linear['b_over_full']['median']):.3f}, "
                           f"W/full {float(linear['w_over_full']['median']):.3f}")]
    return {
        "title": TITLE,
        "table": table,
        "targets": targets,
        "workload": workload,
        "rounds": rounds_out,
        "rows": rows,
    }
