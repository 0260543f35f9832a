"""Small built-in models and data for the demo, the CLI and the benchmarks.

They train on a laptop CPU in seconds and are ``nn.Sequential`` all the way
down, so any of them can be cut into stages at any layer boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """``x + W2 · gelu(W1 · norm(x))``: the MLP half of a transformer layer."""

    def __init__(self, width: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden = hidden or 2 * width
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.down(nn.functional.gelu(self.up(self.norm(x)))))


def residual_mlp(
    features: int = 32, width: int = 128, blocks: int = 8, classes: int = 10, dropout: float = 0.0
) -> nn.Sequential:
    """Input projection, ``blocks`` residual MLP blocks, a classification head."""
    return nn.Sequential(
        nn.Linear(features, width),
        *[ResidualBlock(width, dropout=dropout) for _ in range(blocks)],
        nn.LayerNorm(width),
        nn.Linear(width, classes),
    )


def synthetic_classification(
    samples: int, features: int = 32, classes: int = 10, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Inputs and labels from a fixed random teacher network: learnable, not trivial."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    teacher = torch.randn(features, classes, generator=generator)
    y = (torch.tanh(x) @ teacher + 0.1 * torch.randn(samples, classes, generator=generator)).argmax(1)
    return x, y
