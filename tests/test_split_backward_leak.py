"""Regression: a split backward must free every stage graph by the end of the step."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from pipesched import Pipeline

LOSS = nn.MSELoss()


def test_split_backward_kept_stage_graphs_alive_when_a_node_saved_its_output():
    """Regression: with the meter's saved-tensor hooks, a tanh (which saves its output) held its
    output, the output its node: a cycle only running the node breaks. A split backward's W never
    runs it, so the stage's whole graph, its input leaf included, outlived every zero-bubble step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    refs = []
    for layer in model:
        layer.register_forward_pre_hook(lambda module, args: refs.append(weakref.ref(args[0])))
        layer.register_forward_hook(lambda module, args, out: refs.append(weakref.ref(out)))
    with Pipeline(model, schedule="zb-h1", balance=[2, 2, 1], devices=["cpu"] * 3, chunks=2,
                  checkpoint="never", loss_fn=LOSS) as pipe:
        pipe.step(torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64))
        gc.collect()
        assert [ref for ref in refs if ref() is not None] == []
