"""The engine runs split backwards: B (input gradients), W (parameter gradients), exact.

Every zero-bubble schedule against the un-pipelined model in float64, under
every checkpoint policy, even and uneven splits, plus what W must keep and
free, dropout replay, tuple activations, input gradients, deferred batch norm.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Pipeline

SPLIT = [("zb-h1", 3, [3, 3, 2]), ("zb-v", 2, [2, 2, 2, 2]), ("interleaved-zb", 2, [2, 2, 2, 2]),
         ("dualpipe-v", 2, [2, 2, 2, 2])]
POLICIES = ["never", "always", "except_last", lambda stage, mb: (stage + mb) % 2 == 1]


def batch(rows: int = 13):
    g = torch.Generator().manual_seed(3)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (rows,), generator=g)


@pytest.mark.parametrize("policy", POLICIES, ids=["never", "always", "except_last", "callable"])
@pytest.mark.parametrize("chunks", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("name,ranks,balance", SPLIT, ids=[s[0] for s in SPLIT])
def test_split_schedules_give_the_unpipelined_gradients(name, ranks, balance, chunks, policy):
    model = mlp(layers=8)
    x, y = batch()  # 13 rows: uneven micro-batches
    ref_loss, ref = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    with Pipeline(model, schedule=name, balance=balance, devices=["cpu"] * ranks, chunks=chunks,
                  checkpoint=policy, loss_fn=nn.CrossEntropyLoss()) as pipe:
        loss = pipe.step(x, y)
        report = pipe.last_report
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref)
    weights = {(t.stage, t.microbatch) for t in report.tasks if t.kind == "W"}
    assert weights, "the schedule split no backward"  # a plan may split some backwards only (DualPipeV)
    assert weights <= {(t.stage, t.microbatch) for t in report.tasks if t.kind == "B"}
    assert report.held_activation_bytes == [0] * ranks


def test_a_split_microbatch_stays_in_flight_until_its_w():
    """ZB-H1 holds no more than 1F1B's rank 0 (p), counted until W, not until B."""
    model = mlp(layers=6)
    x, y = batch(16)
    with Pipeline(model, schedule="zb-h1", balance=[2, 2, 2], devices=["cpu"] * 3, chunks=8,
                  checkpoint="never", loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
        report = pipe.last_report
    ends = {(t.kind, t.stage, t.microbatch): (t.start, t.end) for t in report.tasks}
    for rank in range(3):
        times = sorted({ends[("F", rank, m)][1] for m in range(8)})
        # measured in flight at the end of each forward: forwarded, and W not yet finished
        inflight = max(sum(1 for m in range(8) if ends[("F", rank, m)][1] <= when < ends[("W", rank, m)][1])
                       for when in times)
        assert report.peak_inflight[rank] >= inflight
    assert report.peak_inflight[0] <= 3


def test_dropout_masks_are_the_same_split_or_not():
    """Same balance, same seed: zb-h1 (split) and 1f1b (whole backwards) draw the same masks."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.Linear(16, 16), nn.Dropout(0.3),
                         nn.Linear(16, 4)).double()
    x, y = batch(12)
    grads = {}
    for name in ["1f1b", "zb-h1"]:
        model = copy.deepcopy(base)
        torch.manual_seed(9)
        with Pipeline(model, schedule=name, balance=[2, 2, 1], devices=["cpu"] * 3, chunks=4,
                      checkpoint="except_last", loss_fn=nn.CrossEntropyLoss()) as pipe:
            pipe.step(x, y)
        grads[name] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["1f1b"], grads["zb-h1"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


class TwoWay(nn.Module):
    """Returns a tuple: (activation, a second tensor that needs its own gradient)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        if isinstance(x, tuple):
            x = x[0] + x[1]
        h = self.linear(x)
        return torch.tanh(h), h * 0.5


def test_tuple_activations_and_input_gradients_under_zb_v():
    torch.manual_seed(1)
    model = nn.Sequential(TwoWay(), TwoWay(), TwoWay(), nn.Sequential()).double()
    model[3] = LastOfTuple()
    x, y = batch(10)
    x.requires_grad_(True)
    reference = copy.deepcopy(model)
    x_ref = x.detach().clone().requires_grad_(True)
    nn.CrossEntropyLoss()(reference(x_ref)[:, :4], y).backward()
    with Pipeline(model, schedule="zb-v", balance=[1, 1, 1, 1], devices=["cpu"] * 2, chunks=3,
                  loss_fn=lambda out, t: nn.functional.cross_entropy(out[:, :4], t)) as pipe:
        pipe.step(x, y)
    assert_grads_equal(model, [p.grad for p in reference.parameters()])
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)


class LastOfTuple(nn.Module):
    def forward(self, pair):
        return pair[0] + pair[1]


def test_deferred_batch_norm_under_a_split_schedule():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 4)).double()
    reference = copy.deepcopy(model)
    x, y = batch(16)
    with Pipeline(model, schedule="zb-h1", balance=[2, 2, 2], devices=["cpu"] * 3, chunks=4,
                  deferred_batch_norm=True, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
    reference(x)  # one full-batch forward in training mode: the statistics deferred BN must reach
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=0, atol=1e-12)
