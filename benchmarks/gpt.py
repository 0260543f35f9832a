"""A small GPT-style language model as an ``nn.Sequential``, for the CPU benchmarks.

Token + position embedding, pre-norm transformer blocks with causal
self-attention (``scaled_dot_product_attention``), a final norm and the
vocabulary head. The head returns logits as ``(batch, vocab, seq)``, the layout
``nn.CrossEntropyLoss`` takes for sequence targets ``(batch, seq)``, so the
plain loss function works and pipesched weights micro-batches by tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Embedding(nn.Module):
    def __init__(self, vocab: int, width: int, seq: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(seq, width) * 0.02)

    def forward(self, ids: Tensor) -> Tensor:
        return self.tokens(ids) + self.positions[: ids.shape[1]]


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(x)).transpose(1, 2)  # (batch, vocab, seq) for CrossEntropyLoss


@dataclass(frozen=True)
class GPTWorkload:
    """``layers`` blocks of width ``width``; batches of ``batch`` sequences of ``seq`` tokens."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    vocab: int = 512
    seq: int = 64
    batch: int = 16
    seed: int = 0

    def model(self) -> nn.Sequential:
        torch.manual_seed(self.seed)
        return nn.Sequential(
            Embedding(self.vocab, self.width, self.seq),
            *[Block(self.width, self.heads) for _ in range(self.layers)],
            Head(self.width, self.vocab),
        )

    def data(self) -> tuple[Tensor, Tensor]:
        """Token ids and next-token targets (a random stream, shifted by one)."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        stream = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=generator)
        return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()

    def two_rank_balance(self) -> list[int]:
        """Embedding + half the blocks | the other half + head."""
        first = self.layers // 2
        return [1 + first, self.layers - first + 1]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
