"""The same guarantees on CUDA: own compute stream per rank, copy streams, events.

Skipped on machines without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Pipeline

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def data(rows=16, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, 8, dtype=torch.float64, generator=g).to(device),
            torch.randint(0, 4, (rows,), generator=g).to(device))


@pytest.mark.parametrize("schedule,balance,devices", [
    ("gpipe", [3, 3], ["cuda:0", "cuda:0"]),
    ("1f1b", [2, 2, 2], ["cuda:0", "cpu", "cuda:0"]),
    ("interleaved", [2, 1, 1, 2], ["cuda:0", "cuda:0"]),
])
@pytest.mark.parametrize("policy", ["always", "never"])
def test_gradients_match_on_cuda(schedule, balance, devices, policy):
    model = mlp(layers=6)
    x, y = data()
    _, ref = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    with Pipeline(model, schedule=schedule, balance=balance, devices=devices, chunks=4,
                  checkpoint=policy, loss_fn=nn.CrossEntropyLoss()) as pipe:
        streams = [w.stream for w in pipe._orchestrator.workers]
        assert all((s is not None) == (d.type == "cuda") for s, d in zip(streams, pipe.devices))
        pipe.step(x, y)
    torch.cuda.synchronize()
    assert_grads_equal(model, [g.to(p.device) for g, p in zip(ref, model.parameters())], atol=1e-10)


def test_dropout_replay_on_cuda_is_policy_independent():
    x, y = data(device="cuda:0")
    grads = []
    for policy in ["never", "always"]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 4)).double()
        torch.manual_seed(7)
        with Pipeline(model, schedule="1f1b", balance=[2, 1], devices=["cuda:0", "cuda:0"],
                      chunks=4, checkpoint=policy, loss_fn=nn.CrossEntropyLoss()) as pipe:
            pipe.step(x, y)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_one_f_one_b_allocates_less_than_gpipe_on_the_device():
    peaks = {}
    for schedule in ["gpipe", "1f1b"]:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])
        x = torch.randn(2048, 1024, device="cuda:0")
        with Pipeline(model, schedule=schedule, devices=["cuda:0"] * 4, chunks=16,
                      checkpoint="never", loss_fn=nn.MSELoss()) as pipe:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            pipe.step(x, torch.zeros_like(x))
            torch.cuda.synchronize()
            peaks[schedule] = torch.cuda.max_memory_allocated() - base
    assert peaks["1f1b"] < peaks["gpipe"]


def test_tied_weight_on_ranks_sharing_one_device_is_exact():
    from test_shared_layers import NEXT, TOKENS, tied_language_model, token_loss

    model = tied_language_model()
    _, ref = reference_grads(model, token_loss, TOKENS, NEXT)
    with Pipeline(model, schedule="1f1b", balance=[3, 3], devices=["cuda:0", "cuda:0"], chunks=4,
                  checkpoint="except_last", loss_fn=token_loss) as pipe:
        pipe.step(TOKENS.cuda(), NEXT.cuda())
    torch.cuda.synchronize()
    assert_grads_equal(model, [g.cuda() for g in ref], atol=1e-10)


def test_tied_weight_on_two_devices_is_refused_before_anything_moves():
    from test_shared_layers import tied_language_model

    model = tied_language_model()
    with pytest.raises(ValueError, match=r"'0.weight' = '5.weight' is shared by stage 0 \(rank 0, cpu\), "
                                         r"stage 1 \(rank 1, cuda:0\)"):
        Pipeline(model, balance=[3, 3], devices=["cpu", "cuda:0"])
    assert all(p.device.type == "cpu" for p in model.parameters())
