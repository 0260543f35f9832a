"""Every leaf a step's graph reaches gets its plain gradient, whatever the schedule splits.

A loss with learnable parameters (a temperature, an adaptive softmax) and a
loss term that reads a model parameter (a weight regulariser) reach leaves
outside the last stage's module. An un-split backward accumulates into every
leaf it reaches; a split one (B now, W later) must too. Each case runs every
schedule against the un-pipelined model in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import mlp
from pipesched import Pipeline
from pipesched.plan import get_schedule

#: (schedule, balance over an 8-layer MLP, ranks): every schedule the registry has that splits or not.
SCHEDULES = [("gpipe", [4, 4], 2), ("1f1b", [4, 4], 2), ("zb-h1", [4, 4], 2), ("zb-v", [2, 2, 2, 2], 2),
             ("interleaved-zb", [2, 2, 2, 2], 2), ("dualpipe-v", [2, 2, 2, 2], 2), ("auto", [4, 4], 2)]
IDS = [s[0] for s in SCHEDULES]


def batch(rows: int = 12, classes: int = 4):
    g = torch.Generator().manual_seed(5)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, classes, (rows,), generator=g)


class TemperedCrossEntropy(nn.Module):
    """Cross-entropy of ``logits / exp(log_t)``: a loss with a learnable temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, logits, targets):
        return F.cross_entropy(logits / self.log_t.exp(), targets)


class AdaptiveSoftmax(nn.Module):
    """``nn.AdaptiveLogSoftmaxWithLoss`` as a ``loss_fn``: its head and tail projections are the loss's own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(12, 12, cutoffs=[4, 8], div_value=2.0).double()

    def forward(self, features, targets):
        return self.asm(features, targets).loss


def run(schedule, balance, ranks, model, loss_fn, steps=1, chunks=4):
    """``steps`` pipelined steps (gradients accumulate, as the plain model's would)."""
    x, y = batch(classes=12 if isinstance(loss_fn, AdaptiveSoftmax) else 4)
    with Pipeline(model, schedule=get_schedule(schedule), balance=balance, devices=["cpu"] * ranks, chunks=chunks,
                  loss_fn=loss_fn) as pipe:
        losses = [pipe.step(x, y) for _ in range(steps)]
    return losses, x, y


def reference(model, loss_fn, x, y, steps=1):
    """The plain model's loss and the gradients of every leaf, after ``steps`` backwards."""
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        loss.backward()
    return loss.detach()


def assert_same_grads(got: nn.Module, want: nn.Module, what: str) -> None:
    for (name, p), q in zip(got.named_parameters(), want.parameters()):
        assert p.grad is not None, f"{what}: {name} got no gradient"
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=f"{what}: {name}")


@pytest.mark.parametrize("schedule,balance,ranks", SCHEDULES, ids=IDS)
def test_loss_fn_parameter_gets_its_gradient_under_every_schedule(schedule, balance, ranks):
    """Regression: B/W gave only the stage module's parameters to W, so a loss's own parameter got
    ``.grad = None`` under zb-h1, zb-v, interleaved-zb and auto, and a partial one under dualpipe-v."""
    model, loss_fn = mlp(layers=8), TemperedCrossEntropy()
    ref_model, ref_loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn)
    steps = 2 if schedule == "auto" else 1  # auto: the split warm-up, then its synthesised plan
    losses, x, y = run(schedule, balance, ranks, model, loss_fn, steps=steps)
    want = reference(ref_model, ref_loss_fn, x, y, steps=steps)
    torch.testing.assert_close(losses[-1], want, rtol=0, atol=1e-12)
    assert_same_grads(loss_fn, ref_loss_fn, "loss_fn")
    assert_same_grads(model, ref_model, "model")


@pytest.mark.parametrize("schedule,balance,ranks", [s for s in SCHEDULES if s[0] in ("zb-h1", "zb-v", "dualpipe-v")],
                         ids=["zb-h1", "zb-v", "dualpipe-v"])
def test_adaptive_log_softmax_loss_under_split_backward(schedule, balance, ranks):
    """Regression: ``nn.AdaptiveLogSoftmaxWithLoss``'s projections got no gradient under split backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh()).double()
    loss_fn = AdaptiveSoftmax()
    ref_model, ref_loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn)
    losses, x, y = run(schedule, balance, ranks, model, loss_fn)
    want = reference(ref_model, ref_loss_fn, x, y)
    torch.testing.assert_close(losses[-1], want, rtol=0, atol=1e-12)
    assert_same_grads(loss_fn, ref_loss_fn, "loss_fn")
    assert_same_grads(model, ref_model, "model")


@pytest.mark.parametrize("schedule,balance,ranks", SCHEDULES, ids=IDS)
def test_loss_term_reading_a_model_parameter_under_split_backward(schedule, balance, ranks):
    """Regression: a weight regulariser in the loss reads layer 0's weight (a parameter of the
    *first* stage, used by the last); under zb-h1 its whole term (7e-2) was missing from that
    weight's gradient, because W was given the last stage's own parameters only."""
    model = mlp(layers=8)
    ref_model = copy.deepcopy(model)

    def regularised(module):
        return lambda out, y: F.cross_entropy(out, y) + 1e-2 * module[0].weight.square().sum()

    losses, x, y = run(schedule, balance, ranks, model, regularised(model))
    want = reference(ref_model, regularised(ref_model), x, y)
    torch.testing.assert_close(losses[-1], want, rtol=0, atol=1e-12)
    assert_same_grads(model, ref_model, "model")
