"""Loss and gradients equal the un-pipelined model's, in float64, for every schedule.

The reference is always ``loss_fn(model(inputs), targets).backward()`` on an
identical copy of the model: never anything the pipeline computed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Pipeline

SCHEDULES = [("gpipe", [2, 2, 2]), ("1f1b", [2, 2, 2]), ("interleaved-1f1b", [2, 1, 1, 2])]
POLICIES = ["always", "except_last", "never", lambda stage, mb: (stage + mb) % 2 == 0]


def batch(rows: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 4, (rows,), generator=generator)
    return x, y


@pytest.mark.parametrize("schedule,balance", SCHEDULES)
@pytest.mark.parametrize("chunks", range(1, 9))
@pytest.mark.parametrize("policy", POLICIES, ids=["always", "except_last", "never", "callable"])
@pytest.mark.parametrize("rows", [8, 11])
def test_step_matches_unpipelined(schedule, balance, chunks, policy, rows):
    model = mlp(layers=6)
    x, y = batch(rows)
    loss_fn = nn.CrossEntropyLoss()
    ref_loss, ref_grads = reference_grads(model, loss_fn, x, y)
    with Pipeline(model, schedule=schedule, balance=balance, chunks=chunks,
                  checkpoint=policy, loss_fn=loss_fn) as pipe:
        loss = pipe.step(x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert not loss.requires_grad
    assert_grads_equal(model, ref_grads)


@pytest.mark.parametrize("schedule,balance", SCHEDULES)
def test_fewer_rows_than_chunks_runs_one_row_per_microbatch(schedule, balance):
    model = mlp(layers=6)
    x, y = batch(3)
    loss_fn = nn.CrossEntropyLoss()
    _, ref_grads = reference_grads(model, loss_fn, x, y)
    with Pipeline(model, schedule=schedule, balance=balance, chunks=8, loss_fn=loss_fn) as pipe:
        pipe.step(x, y)
        assert pipe.last_report.num_microbatches == 3
        assert {t.microbatch for t in pipe.last_report.tasks} == {0, 1, 2}
    assert_grads_equal(model, ref_grads)


def test_sum_reduced_loss_is_not_rescaled():
    model = mlp(layers=6)
    x, y = batch(10)
    target = torch.randn(10, 4, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    ref_loss, ref_grads = reference_grads(model, loss_fn, x, target)
    with Pipeline(model, schedule="1f1b", balance=[3, 3], chunks=3, loss_fn=loss_fn) as pipe:
        loss = pipe.step(x, target)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10)
    assert_grads_equal(model, ref_grads, atol=1e-10)


def test_gradients_accumulate_across_steps():
    model = mlp(layers=6)
    x, y = batch(8)
    loss_fn = nn.CrossEntropyLoss()
    _, ref_grads = reference_grads(model, loss_fn, x, y)
    with Pipeline(model, schedule="1f1b", balance=[3, 3], chunks=4, loss_fn=loss_fn) as pipe:
        pipe.step(x, y)
        pipe.step(x, y)
    assert_grads_equal(model, [2 * g for g in ref_grads])


def test_input_requiring_grad_gets_its_gradient():
    model = mlp(layers=6)
    x, y = batch(9)
    loss_fn = nn.CrossEntropyLoss()
    x_ref = x.clone().requires_grad_()
    loss_fn(copy.deepcopy(model)(x_ref), y).backward()
    x_pipe = x.clone().requires_grad_()
    with Pipeline(model, schedule="interleaved", balance=[2, 1, 1, 2], chunks=4, loss_fn=loss_fn) as pipe:
        pipe.step(x_pipe, y)
    torch.testing.assert_close(x_pipe.grad, x_ref.grad, rtol=0, atol=1e-12)


class SplitHalves(nn.Module):
    """Returns a tuple with a float part, another float part, and an integer tensor."""

    def forward(self, x):
        return x[:, :6] * 2.0, x[:, 6:].sin(), torch.full((x.shape[0],), 3, dtype=torch.long)


class Merge(nn.Module):
    def forward(self, parts):
        a, b, n = parts
        return torch.cat([a, b * n.unsqueeze(1).to(b.dtype)], dim=1)


class AddPair(nn.Module):
    def forward(self, pair):
        x1, x2 = pair
        return x1 + 0.5 * x2


class TupleLoss:
    """A loss taking a tuple target (two target tensors)."""

    reduction = "mean"

    def __call__(self, output, target):
        labels, weights = target
        return nn.functional.cross_entropy(output, labels) + (output.sum(1) * weights).mean()


@pytest.mark.parametrize("schedule,balance", [("gpipe", [2, 2, 2]), ("1f1b", [2, 2, 2]),
                                              ("interleaved", [1, 1, 2, 2])])
@pytest.mark.parametrize("policy", ["always", "never"])
def test_tuple_inputs_activations_and_targets(schedule, balance, policy):
    torch.manual_seed(0)
    model = nn.Sequential(AddPair(), nn.Linear(8, 8), SplitHalves(), Merge(), nn.Tanh(),
                          nn.Linear(8, 4)).double()
    generator = torch.Generator().manual_seed(3)
    x1 = torch.randn(7, 8, dtype=torch.float64, generator=generator)
    x2 = torch.randn(7, 8, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 4, (7,), generator=generator)
    weights = torch.rand(7, dtype=torch.float64, generator=generator)
    loss_fn = TupleLoss()
    ref_loss, ref_grads = reference_grads(model, loss_fn, (x1, x2), (labels, weights))
    with Pipeline(model, schedule=schedule, balance=balance, chunks=3, checkpoint=policy,
                  loss_fn=loss_fn) as pipe:
        loss = pipe.step((x1, x2), (labels, weights))
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref_grads)


class TestForwardThenBackward:
    """The torchgpipe habit: loss_fn(pipe(x), y).backward()."""

    @pytest.mark.parametrize("policy", ["always", "except_last", "never"])
    def test_gpipe_backward_through_output(self, policy):
        model = mlp(layers=6)
        x, y = batch(10)
        x = x.requires_grad_()
        loss_fn = nn.CrossEntropyLoss()
        x_ref = x.detach().clone().requires_grad_()
        ref = copy.deepcopy(model)
        loss_fn(ref(x_ref), y).backward()
        with Pipeline(model, schedule="gpipe", balance=[2, 2, 2], chunks=4, checkpoint=policy) as pipe:
            out = pipe(x)
            assert out.shape == (10, 4) and out.requires_grad
            torch.testing.assert_close(out, ref(x_ref), rtol=0, atol=1e-12)
            loss_fn(out, y).backward()
            kinds = [t.kind for t in pipe.last_report.tasks]
            assert kinds.count("F") == kinds.count("B") == 12
        assert_grads_equal(model, [p.grad for p in ref.parameters()])
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)

    def test_second_backward_through_output_says_once_per_forward(self):
        """The bug: a second backward raised AttributeError ('NoneType' ... 'backward')."""
        model = mlp(layers=6)
        x, y = batch(6)
        with Pipeline(model, schedule="gpipe", balance=[3, 3], chunks=3) as pipe:
            out = pipe(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward(retain_graph=True)
            first = [p.grad.clone() for p in model.parameters()]
            assert pipe.last_report.held_activation_bytes == [0, 0]  # freed by the first backward
            with pytest.raises(RuntimeError, match="can only run once per forward.*run pipe\\(inputs\\) again"):
                loss.backward()
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), first))
            nn.functional.cross_entropy(pipe(x), y).backward()  # a new forward: a new backward
        assert_grads_equal(model, [2 * g for g in first])

    def test_interleaving_schedule_points_to_step(self):
        model = mlp(layers=6)
        x, y = batch(6)
        with Pipeline(model, schedule="1f1b", balance=[3, 3], chunks=3) as pipe:
            out = pipe(x)
            with pytest.raises(RuntimeError, match=r"step\(inputs, targets\)"):
                nn.functional.cross_entropy(out, y).backward()

    def test_inference_under_no_grad_holds_nothing(self):
        model = mlp(layers=6)
        x, _ = batch(6)
        with torch.no_grad():
            expected = model(x)
        with Pipeline(model, schedule="1f1b", balance=[3, 3], chunks=3) as pipe, torch.no_grad():
            out = pipe(x)
            assert not out.requires_grad
            assert pipe.last_report.peak_activation_bytes == [0, 0]
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)

    def test_tuple_output_is_gathered_as_tuple(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), SplitHalves()).double()
        x, _ = batch(5)
        with Pipeline(model, balance=[1, 1], chunks=2) as pipe, torch.no_grad():
            out = pipe(x)
        expected = model(x)
        assert isinstance(out, tuple) and len(out) == 3
        for got, want in zip(out, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
