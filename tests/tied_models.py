"""A small GPT-like model with tied weights, shared by the single- and multi-process tests.

Embedding → residual blocks → head whose projection *is* the embedding's
weight (weight tying), and the first two blocks share their ``up``
projection (ALBERT-style cross-layer sharing, through two distinct layer
objects). :func:`gpt_balance` puts the embedding and block 0 in stage 0 and
block 1 at the start of stage 1, so the block tie crosses ranks under every
placement (the V placements put the first and last stage on one rank, which
keeps the embedding tie on one rank there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, WIDTH = 13, 8


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Head(nn.Module):
    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def gpt_like(layers: int, seed: int = 0) -> nn.Sequential:
    """``layers`` layers (>= 4): embedding, ``layers - 2`` blocks, head; float64."""
    torch.manual_seed(seed)
    emb = nn.Embedding(VOCAB, WIDTH)
    blocks = [Block(WIDTH) for _ in range(layers - 2)]
    blocks[1].up.weight = blocks[0].up.weight
    head = Head(WIDTH, VOCAB)
    head.proj.weight = emb.weight
    return nn.Sequential(emb, *blocks, head).double()


def gpt_balance(layers: int, stages: int) -> list[int]:
    """Stage 0 = embedding + block 0; the rest split evenly (block 1 opens stage 1)."""
    rest = layers - 2
    return [2] + [rest // (stages - 1) + (1 if i < rest % (stages - 1) else 0) for i in range(stages - 1)]


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def tokens(rows: int = 9, length: int = 5, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (rows, length), generator=g),
            torch.randint(0, VOCAB, (rows, length), generator=g))
