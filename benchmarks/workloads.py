"""The residual-MLP workload of benchmarks 2-5 and its un-pipelined baselines.

Every process (the benchmark and the gloo peers it spawns) builds the same
model from the same seed and the same batch from the same data seed, so the
contenders start from identical weights and their gradients can be compared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from pipesched.cli.models import residual_mlp, synthetic_classification


@dataclass(frozen=True)
class Workload:
    """``residual_mlp(features, width, blocks, classes)`` on a batch of ``batch`` rows."""

    width: int
    blocks: int
    batch: int
    chunks: int = 1
    features: int = 32
    classes: int = 10
    seed: int = 0
    data_seed: int = 1

    def model(self) -> nn.Sequential:
        torch.manual_seed(self.seed)
        return residual_mlp(self.features, self.width, self.blocks, self.classes)

    def data(self) -> tuple[Tensor, Tensor]:
        return synthetic_classification(self.batch, self.features, self.classes, seed=self.data_seed)

    def two_rank_balance(self) -> list[int]:
        """Input layer + half the blocks | the other half + norm + head: equal block counts."""
        first = self.blocks // 2
        return [1 + first, self.blocks - first + 2]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def loss_fn() -> nn.Module:
    return nn.CrossEntropyLoss()


def zero_grad(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def fresh_step(pipe: Callable[[Tensor, Tensor], object], model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """One pipeline step from zero gradients, as every contender starts its steps."""

    def step() -> None:
        zero_grad(model)
        pipe(x, y)

    return step


def naive_step(model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, chunks: int = 1) -> Callable[[], None]:
    """One step of the plain model: the same micro-batches as the pipeline, accumulated in a loop.

    ``chunks=1`` is the whole batch at once. Micro-batch losses are weighted by
    their share of the rows, so the gradients equal the whole batch's.
    """
    parts = list(zip(x.tensor_split(chunks), y.tensor_split(chunks)))
    rows = x.shape[0]

    def step() -> None:
        zero_grad(model)
        for xm, ym in parts:
            (criterion(model(xm), ym) * (xm.shape[0] / rows)).backward()

    return step


def named_grads(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    wanted = None if names is None else set(names)
    return {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.grad is not None and (wanted is None or name in wanted)
    }


def reference_grads(workload: Workload) -> dict[str, Tensor]:
    """Gradients of ``loss_fn(model(x), y).backward()`` on the whole batch, un-pipelined."""
    model = workload.model()
    x, y = workload.data()
    loss_fn()(model(x), y).backward()
    return named_grads(model)


def grad_difference(got: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, object]:
    """Largest absolute difference, relative to the largest expected gradient entry.

    ``missing``/``extra`` name parameters present on one side only.
    """
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    common = sorted(set(got) & set(expected))
    max_abs = max((float((got[n] - expected[n]).abs().max()) for n in common), default=float("nan"))
    scale = max((float(expected[n].abs().max()) for n in common), default=float("nan"))
    return {
        "max_abs_diff": max_abs,
        "max_abs_grad": scale,
        "relative": max_abs / scale if scale else float("nan"),
        "parameters": len(common),
        "missing": missing,
        "extra": extra,
    }


#: float32 gradients that differ only by summation order agree to about 1e-6 relative.
GRAD_RTOL = 1e-4


def grads_match(diff: dict[str, object]) -> bool:
    return not diff["missing"] and not diff["extra"] and float(diff["relative"]) <= GRAD_RTOL  # type: ignore[arg-type]
