"""Skip connections on CUDA: skip tensors and their gradients between devices on the copy streams.

Skipped on machines without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_grads_equal, reference_grads
from skip_models import UNET_BALANCE, unet, unet_data
from torch import nn

from pipesched import Pipeline

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("schedule,devices", [
    ("1f1b", ["cuda:0", "cpu", "cuda:0", "cpu"]),   # every edge crosses a device
    ("zb-v", ["cuda:0", "cpu"]),                     # V placement: 0→3 stays on cuda:0, 0→2 and 2→3 cross
    ("gpipe", ["cuda:0"] * 4),                       # one device, one copy stream per rank
])
@pytest.mark.parametrize("policy", ["always", "never"])
def test_skip_gradients_match_on_cuda(schedule, devices, policy):
    model = unet()
    x, y = unet_data(rows=12)
    loss_fn = nn.MSELoss()
    _, ref = reference_grads(model, loss_fn, x, y)
    with Pipeline(model, schedule=schedule, balance=UNET_BALANCE, devices=devices, chunks=4,
                  checkpoint=policy, loss_fn=loss_fn) as pipe:
        pipe.step(x, y)
        assert pipe.last_report.held_activation_bytes == [0] * len(devices)
    torch.cuda.synchronize()
    assert_grads_equal(model, [g.to(p.device) for g, p in zip(ref, model.parameters())], atol=1e-10)
