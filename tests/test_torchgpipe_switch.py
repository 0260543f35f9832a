"""A torchgpipe user's switch, all features at once: skips + tied weights + balance + GPipe.

Each feature has its own test file; this one pins that they compose. A model
whose skip connection crosses stages *and* whose first and last layers share
a weight runs on two devices (``cpu:0``, ``cpu:1``: two devices for torch, so
the replica path of a two-GPU run is taken), cut by ``balance_by_size``,
through ``GPipe`` as torchgpipe users call it and through a zero-bubble
``Pipeline``; gradients equal the plain model's in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipesched import GPipe, Pipeline
from pipesched.balance import balance_by_size
from pipesched.skip import pop, skippable, stash, verify_skippables

WIDTH = 5


@skippable(stash=["early"])
class Early(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        yield stash("early", y)
        return y


@skippable(pop=["early"])
class Late(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        early = yield pop("early")
        return torch.tanh(self.lin(x)) + early


def skip_and_tied_model() -> nn.Sequential:
    torch.manual_seed(3)
    first, last = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
    last.weight = first.weight  # tied across the first and the last stage
    model = nn.Sequential(first, Early(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), Late(), last)
    return model.double()


def plain_gradients(model, x, y):
    ref = copy.deepcopy(model)
    nn.functional.mse_loss(ref(x), y).backward()
    return {name: p.grad.clone() for name, p in ref.named_parameters()}


def assert_same(model, expected):
    got = dict(model.named_parameters())
    assert set(got) == set(expected)
    for name, param in got.items():
        torch.testing.assert_close(param.grad, expected[name], rtol=0, atol=1e-12, msg=name)


def data(rows=7):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(rows, WIDTH, dtype=torch.float64, generator=g),
            torch.randn(rows, WIDTH, dtype=torch.float64, generator=g))


def test_gpipe_with_skips_tied_weight_and_balance_on_two_devices():
    model = skip_and_tied_model()
    verify_skippables(model)
    x, y = data()
    expected = plain_gradients(model, x, y)
    balance = balance_by_size(2, model, x[:2], device="cpu")
    assert sum(balance) == len(model) and len(balance) == 2
    pipe = GPipe(model, balance, devices=["cpu:0", "cpu:1"], chunks=3, checkpoint="always")
    model.train()
    out = pipe(x)
    nn.functional.mse_loss(out, y).backward()
    assert_same(model, expected)


@pytest.mark.parametrize("schedule", ["zb-h1", "1f1b"])
def test_pipeline_with_skips_and_tied_weight_on_two_devices(schedule):
    model = skip_and_tied_model()
    x, y = data()
    expected = plain_gradients(model, x, y)
    pipe = Pipeline(model, schedule=schedule, balance=[3, 3], devices=["cpu:0", "cpu:1"], chunks=4,
                    checkpoint="except_last", loss_fn=nn.MSELoss())
    try:
        pipe.step(x, y)
        assert_same(model, expected)
    finally:
        pipe.close()


def test_profile_of_a_model_with_skip_connections_found_nothing_stashed():
    """Regression: profile (and so balance_by_time/size and tune) times layers one at a
    time, so a pop found nothing stashed and raised; now every layer is timed."""
    from pipesched import profile
    from pipesched.balance import balance_by_time

    model = skip_and_tied_model()
    x, y = data()
    measured = profile(model, x[:3], repeat=1)
    assert len(measured.layers) == len(model)
    late = measured.layers[4]
    assert late.name == "Late" and late.forward_s > 0 and late.backward_input_s > 0
    balance = balance_by_time(3, model, x[:3], timeout=0.05, device="cpu")
    assert sum(balance) == len(model) and len(balance) == 3
