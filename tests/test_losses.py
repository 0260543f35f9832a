"""Losses whose mean is not over rows: every micro-batch counts by its share of the batch's normaliser.

Each test compares against ``loss_fn(model(x), y).backward()`` on an
identical copy of the un-pipelined model, in float64, with padding
(``ignore_index``) spread unevenly over the micro-batches, including a
micro-batch that is all padding.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Pipeline

SCHEDULES = [("gpipe", [2, 2, 2]), ("1f1b", [2, 2, 2]), ("interleaved-1f1b", [2, 1, 1, 2])]
CHUNKS = 4
IGNORE = -100


def padded_batch(rows: int = 16, seed: int = 1):
    """16 rows in 4 micro-batches of 4: the second is all padding, the others 1, 3 and 4 tokens."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 4, (rows,), generator=generator)
    y[[0, 1, 2, 4, 5, 6, 7, 8]] = IGNORE
    return x, y


CLASS_WEIGHT = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)


def check(loss_fn, x, y, schedule="1f1b", balance=(2, 2, 2), chunks=CHUNKS, model=None, **kwargs):
    model = model if model is not None else mlp(layers=6)
    ref_loss, ref_grads = reference_grads(model, loss_fn, x, y)
    assert torch.isfinite(ref_loss)
    with Pipeline(model, schedule=schedule, balance=list(balance), chunks=chunks, loss_fn=loss_fn,
                  **kwargs) as pipe:
        loss = pipe.step(x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref_grads)


def test_ignore_index_padding_weighted_by_tokens_not_rows():
    """The bug: micro-batch losses were weighted by rows, so padded batches got wrong gradients."""
    x, y = padded_batch()
    y[4] = 1  # no all-padding micro-batch here: micro-batches hold 1, 1, 3 and 4 tokens
    check(nn.CrossEntropyLoss(ignore_index=IGNORE), x, y)


@pytest.mark.parametrize("schedule,balance", SCHEDULES)
@pytest.mark.parametrize(
    "loss_fn, padded",
    [
        (nn.CrossEntropyLoss(ignore_index=IGNORE), True),
        (nn.CrossEntropyLoss(ignore_index=3), True),  # another ignore_index: class 3 is padding too
        (nn.CrossEntropyLoss(weight=CLASS_WEIGHT), False),  # no padding: rows count weight[target]
        (nn.CrossEntropyLoss(weight=CLASS_WEIGHT, ignore_index=IGNORE), True),
        (nn.CrossEntropyLoss(ignore_index=IGNORE, label_smoothing=0.2), True),
        (nn.CrossEntropyLoss(weight=CLASS_WEIGHT, ignore_index=IGNORE, label_smoothing=0.2), True),
    ],
    ids=["ignore", "ignore-3", "weight", "weight-ignore", "smoothing-ignore", "weight-smoothing-ignore"],
)
def test_cross_entropy_matches_unpipelined(loss_fn, padded, schedule, balance):
    x, y = padded_batch()
    if loss_fn.ignore_index != IGNORE:
        y[y == IGNORE] = loss_fn.ignore_index
    if not padded:
        y[y == IGNORE] = torch.arange(8) % 4  # every row a real class
    check(loss_fn, x, y, schedule, balance)


@pytest.mark.parametrize("schedule,balance", SCHEDULES)
@pytest.mark.parametrize("weight", [None, CLASS_WEIGHT], ids=["plain", "weighted"])
def test_nll_loss_with_ignore_index(schedule, balance, weight):
    x, y = padded_batch()
    model = nn.Sequential(*mlp(layers=5), nn.LogSoftmax(dim=1))
    check(nn.NLLLoss(weight=weight, ignore_index=IGNORE), x, y, schedule, balance, model=model)


class Tokens(nn.Module):
    """(N, 8) -> (N, 4 classes, 3 positions): a sequence model's logits for CE over (N, C, T)."""

    def forward(self, x):
        return torch.stack([x, x.roll(1, dims=1), 2 * x], dim=2)


@pytest.mark.parametrize("schedule,balance", SCHEDULES)
def test_sequence_targets_count_tokens(schedule, balance):
    """Targets (N, T) with padding spread over rows and positions; CE over (N, C, T)."""
    x, _ = padded_batch()
    generator = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (16, 3), generator=generator)
    y[4:8] = IGNORE  # micro-batch 1: all padding
    y[0, 1:] = IGNORE  # micro-batch 0: 10 tokens
    y[9:12, 2] = IGNORE  # micro-batch 2: 9 tokens
    model = nn.Sequential(*mlp(layers=5), Tokens())
    check(nn.CrossEntropyLoss(weight=CLASS_WEIGHT, ignore_index=IGNORE, label_smoothing=0.1),
          x, y, schedule, balance, model=model)


class FlatCE(nn.Module):
    """A model that reshapes to (N*T, C) logits itself, with targets still (N, T): a plain function loss."""

    def forward(self, x):
        return x.reshape(x.shape[0], -1, 4)


def test_custom_loss_normalizer_declares_a_plain_functions_mean():
    x, _ = padded_batch()
    generator = torch.Generator().manual_seed(4)
    y = torch.randint(0, 4, (16, 3), generator=generator)
    y[12:] = IGNORE
    y[1, :2] = IGNORE

    def loss_fn(logits, targets):  # pipesched cannot look into a function: the normaliser is declared
        return nn.functional.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1), ignore_index=IGNORE)

    for schedule, balance in [("gpipe", [3, 2, 2]), ("interleaved", [2, 2, 2, 1])]:
        model = nn.Sequential(*mlp(layers=5), nn.Linear(4, 12).double(), FlatCE())
        check(loss_fn, x, y, schedule, balance, model=model,
              loss_normalizer=lambda targets: (targets != IGNORE).sum())


def test_probability_targets_are_weighted_by_rows():
    x, _ = padded_batch()
    probs = torch.softmax(torch.randn(16, 4, dtype=torch.float64), dim=1)
    check(nn.CrossEntropyLoss(weight=CLASS_WEIGHT, label_smoothing=0.1), x, probs, chunks=5)


def test_all_padding_batch_returns_nan_and_adds_no_gradient():
    x, y = padded_batch()
    y[:] = IGNORE
    model = mlp(layers=6)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    assert torch.isnan(loss_fn(model(x), y))  # what torch says: 0/0
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    with Pipeline(model, schedule="1f1b", balance=[2, 2, 2], chunks=CHUNKS, loss_fn=loss_fn) as pipe:
        loss = pipe.step(x, y)
        assert math.isnan(loss.item())
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
        y[-1] = 1  # the next batch, with one token, trains normally
        ref_loss, ref_grads = reference_grads(model, loss_fn, x, y)
        model.zero_grad()
        torch.testing.assert_close(pipe.step(x, y), ref_loss, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref_grads)


def test_all_padding_microbatch_sends_no_gradient_upstream_but_inputs_get_zeros():
    x, y = padded_batch()
    x.requires_grad_(True)
    model = mlp(layers=6)
    reference = x.detach().clone().requires_grad_(True)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(copy.deepcopy(model)(reference), y).backward()
    with Pipeline(model, schedule="gpipe", balance=[2, 2, 2], chunks=CHUNKS, loss_fn=loss_fn) as pipe:
        pipe.step(x, y)
    torch.testing.assert_close(x.grad, reference.grad, rtol=0, atol=1e-12)
    assert torch.equal(x.grad[4:8], torch.zeros(4, 8, dtype=torch.float64))


def test_sum_reduction_counts_every_microbatch_once():
    x, y = padded_batch()
    check(nn.CrossEntropyLoss(reduction="sum", ignore_index=IGNORE), x, y)


@pytest.mark.parametrize(
    "normalizer, error, pattern",
    [
        (lambda y: torch.ones(2), ValueError, "number or a 0-dim tensor"),
        (lambda y: "3", TypeError, r"loss_normalizer returned '3' for micro-batch 0"),
        (lambda y: -1, ValueError, "finite and >= 0"),
        (lambda y: float("nan"), ValueError, "finite and >= 0"),
    ],
)
def test_bad_loss_normalizer_results_are_refused_before_anything_runs(normalizer, error, pattern):
    x, y = padded_batch()
    with Pipeline(mlp(layers=6), balance=[3, 3], chunks=CHUNKS, loss_fn=nn.CrossEntropyLoss(),
                  loss_normalizer=normalizer) as pipe:
        with pytest.raises(error, match=pattern):
            pipe.step(x, y)
        assert pipe.last_report is None


def test_class_weight_and_out_of_range_target_names_the_classes():
    x, y = padded_batch()
    y[-1] = 7
    with Pipeline(mlp(layers=6), balance=[3, 3], chunks=CHUNKS,
                  loss_fn=nn.CrossEntropyLoss(weight=CLASS_WEIGHT)) as pipe:
        with pytest.raises(ValueError, match=r"targets hold class 7, but loss_fn.weight has 4 classes"):
            pipe.step(x, y)


def test_subclass_overriding_forward_warns_and_names_the_fix():
    class Reshaping(nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            return super().forward(logits.flatten(0, 1), targets.flatten())

    with pytest.warns(UserWarning, match=r"loss_normalizer=lambda y: \(y != -100\).sum\(\)"):
        Pipeline(mlp(layers=6), balance=[3, 3], loss_fn=Reshaping()).close()

    class Plain(nn.CrossEntropyLoss):
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pipeline(mlp(layers=6), balance=[3, 3], loss_fn=Plain()).close()
        Pipeline(mlp(layers=6), balance=[3, 3], loss_fn=Reshaping(), loss_normalizer=len).close()


def lm_batch():
    """Token targets (16, 3), padded unevenly: rows weigh differently from tokens."""
    x, _ = padded_batch()
    generator = torch.Generator().manual_seed(4)
    y = torch.randint(0, 4, (16, 3), generator=generator)
    y[12:] = IGNORE
    y[1, :2] = IGNORE
    y[5, 1] = IGNORE
    return x, y


def lm_model():
    return nn.Sequential(*mlp(layers=5), nn.Linear(4, 12).double(), FlatCE())


def _around(ce):
    return lambda out, y: ce(out.flatten(0, 1), y.flatten())


FUNCTION_LOSSES = {
    "F.cross_entropy": lambda out, y: nn.functional.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100),
    "nn.CrossEntropyLoss": _around(nn.CrossEntropyLoss()),
}


def _normaliser_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "loss_normalizer=" in str(w.message)]


@pytest.mark.parametrize("name", FUNCTION_LOSSES)
def test_function_loss_with_ignore_index_targets_warns_or_is_exact(name):
    """Rows weigh the micro-batches of a function pipesched cannot look into: it says so, once per pipeline."""
    loss_fn = FUNCTION_LOSSES[name]
    x, y = lm_batch()
    for _ in range(2):  # each pipeline warns once, however many steps
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Pipeline(lm_model(), schedule="1f1b", balance=[3, 2, 2], chunks=CHUNKS, loss_fn=loss_fn) as pipe:
                pipe.step(x, y)
                pipe.step(x, y)
        messages = _normaliser_warnings(caught)
        assert len(messages) == 1, messages
        assert "loss_normalizer=lambda y: (y != -100).sum()" in messages[0] and "-100" in messages[0]
    with warnings.catch_warnings():  # the fix the warning names is exact, and silences it
        warnings.simplefilter("error")
        check(loss_fn, x, y, "1f1b", [3, 2, 2], model=lm_model(), loss_normalizer=lambda t: (t != IGNORE).sum())


def test_function_loss_warning_names_a_visible_ignore_index():
    x, y = lm_batch()
    y[y == IGNORE] = 3  # class 3 is the padding now
    loss_fn = _around(nn.CrossEntropyLoss(ignore_index=3))
    with pytest.warns(UserWarning, match=r"loss_normalizer=lambda y: \(y != 3\).sum\(\)"):
        with Pipeline(lm_model(), balance=[3, 2, 2], chunks=CHUNKS, loss_fn=loss_fn) as pipe:
            pipe.step(x, y)


@pytest.mark.parametrize("name", FUNCTION_LOSSES)
def test_function_loss_without_ignored_targets_does_not_warn(name):
    x, y = lm_batch()
    y[y == IGNORE] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Pipeline(lm_model(), balance=[3, 2, 2], chunks=CHUNKS, loss_fn=FUNCTION_LOSSES[name]) as pipe:
            pipe.step(x, y)
        with Pipeline(mlp(layers=6), balance=[3, 3], chunks=CHUNKS, loss_fn=nn.CrossEntropyLoss()) as pipe:
            pipe.step(*padded_batch())  # a recognised loss counts the tokens itself: nothing to say


@pytest.mark.parametrize("kind", ["bare", "partial"])
def test_functional_cross_entropy_passed_as_is_is_weighted_exactly(kind):
    """F.cross_entropy itself (or a partial of keywords) is the module's computation: exact, no warning."""
    import functools

    x, y = padded_batch()
    loss_fn = nn.functional.cross_entropy if kind == "bare" else functools.partial(
        nn.functional.cross_entropy, weight=CLASS_WEIGHT, label_smoothing=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(loss_fn, x, y)
