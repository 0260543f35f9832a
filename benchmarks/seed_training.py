"""One training recipe for every contender of the seed's pipeline-vs-data-parallel table.

A pipeline and the data-parallel processes run the same loop: the same model
initialisation (``torch.manual_seed(seed)`` before :func:`build`), the same
global batches in the same order (:func:`benchmarks.digits.epoch_batches`),
the same SGD with momentum, weight decay and one-cycle learning rate per
step, the same number of epochs; only ``step(x, y)``, which runs forward and
backward of one global batch (or, in a data-parallel process, its share of
it), differs. Accuracy is top-1 on the fixed test split, the model in
``eval()`` mode (batch norm's running statistics), after the last epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from benchmarks.digits import Digits, epoch_batches
from benchmarks.mobilenet import mobilenet_v2


@dataclass(frozen=True)
class Recipe:
    size: int = 32            # images upsampled from 8 x 8 to size x size
    width_mult: float = 0.5   # MobileNetV2's width multiplier
    batch: int = 64           # global batch
    epochs: int = 10
    lr: float = 0.05          # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 4e-5

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def build(recipe: Recipe, seed: int) -> nn.Sequential:
    """MobileNetV2 for the 10 digits, initialised from ``seed``."""
    torch.manual_seed(seed)
    return mobilenet_v2(num_classes=10, width_mult=recipe.width_mult)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 256) -> float:
    """Top-1 accuracy of ``model`` in eval mode (restored to train mode after)."""
    model.eval()
    try:
        with torch.no_grad():
            hits = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch)))
    finally:
        model.train()
    return hits / len(y)


def train(model: nn.Module, step: Callable[[Tensor, Tensor], object], recipe: Recipe, data: Digits,
          seed: int, shard: Callable[[Tensor], Tensor] = lambda idx: idx) -> dict[str, float]:
    """Train ``model`` by ``step(x, y)`` per global batch; returns seconds (training only) and accuracy.

    ``shard(indices)`` picks this process's part of each global batch (data
    parallelism); the optimizer sees ``model``'s parameters, whose gradients
    ``step`` leaves as the global batch's mean loss would.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    per_epoch = len(data.y_train) // recipe.batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * per_epoch)
    model.train()
    start = time.perf_counter()
    samples = 0
    for epoch in range(recipe.epochs):
        for indices in epoch_batches(len(data.y_train), recipe.batch, seed, epoch):
            mine = shard(indices)
            optimizer.zero_grad(set_to_none=True)
            step(data.x_train[mine], data.y_train[mine])
            optimizer.step()
            schedule.step()
            samples += len(indices)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": samples, "accuracy": accuracy(model, data.x_test, data.y_test)}
