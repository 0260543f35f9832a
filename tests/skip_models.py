"""Models with skip connections for the skip tests (also imported by the multi-process scenarios)."""

from __future__ import annotations

import torch
from torch import nn

from pipesched.skip import Namespace, pop, skippable, stash

WIDTH = 6


@skippable(stash=["skip"])
class Down(nn.Module):
    """Stashes its own output (a tensor with a graph)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        y = self.drop(torch.tanh(self.lin(x)))
        yield stash("skip", y)
        return y * 0.5


@skippable(pop=["skip"])
class Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        skip = yield pop("skip")
        return torch.tanh(self.lin(x)) * skip + skip


@skippable(stash=["inp"])
class StashInput(nn.Module):
    """Stashes its input as is (on a stage other than the first: the stage's input leaf)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        yield stash("inp", x)
        return torch.sin(self.lin(x))


@skippable(pop=["inp"])
class PopInput(nn.Module):
    def forward(self, x):
        inp = yield pop("inp")
        return x * inp


@skippable(pop=["skip", "inp"])
class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        skip = yield pop("skip")
        inp = yield pop("inp")
        return self.lin(x + skip) * inp


#: Layers per stage of :func:`unet`: 4 stages.
UNET_BALANCE = [2, 2, 3, 3]


def unet(seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    """A U-Net-like float64 model in 4 stages (``UNET_BALANCE``) whose skips cross 1, 2 and 3 stages.

    ::

        stage 0: Down(ns3) Down(ns2)          ns3 0→3, ns2 0→2 (two edges out of one stage)
        stage 1: Down(ns1) Linear             ns1 1→2
        stage 2: StashInput Up(ns1) Up(ns2)   "inp" 2→3: the stage's input leaf itself
        stage 3: StashInput(ns4) PopInput(ns4) Head(ns3 for "skip")   ns4: within the stage
    """
    torch.manual_seed(seed)
    ns1, ns2, ns3, ns4 = Namespace(), Namespace(), Namespace(), Namespace()
    return nn.Sequential(
        Down(dropout).isolate(ns3), Down().isolate(ns2),
        Down().isolate(ns1), nn.Linear(WIDTH, WIDTH),
        StashInput(), Up().isolate(ns1), Up().isolate(ns2),
        StashInput().isolate(ns4), PopInput().isolate(ns4), Head().isolate(ns3, only=["skip"]),
    ).double()


def unet_data(rows: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, WIDTH, dtype=torch.float64, generator=g),
            torch.randn(rows, WIDTH, dtype=torch.float64, generator=g))
