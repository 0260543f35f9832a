"""``DeferredBatchNorm`` used on its own, as torchgpipe's: one update every ``chunks`` training forwards.

The reference is plain ``nn.BatchNorm`` in float64 on the whole batch (for
statistics) or on each micro-batch (for outputs and gradients). Inside a
pipeline the step decides when to update (tests/test_batchnorm.py); the two
must not mix.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipesched import DeferredBatchNorm, Pipeline, convert_deferred_batch_norm

CHUNKS = 4


def skewed_images(rows: int = 16, seed: int = 0) -> torch.Tensor:
    """Channels of very different scale and a mean that drifts from row to row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, 3, 5, 5, dtype=torch.float64, generator=g)
    x = x * torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64).view(1, 3, 1, 1)
    return x + torch.arange(rows, dtype=torch.float64).view(rows, 1, 1, 1)


def chunked(module: nn.Module, x: torch.Tensor, chunks: int = CHUNKS) -> torch.Tensor:
    return torch.cat([module(part) for part in x.chunk(chunks)])


def assert_statistics_equal(got: nn.Module, want: nn.Module) -> None:
    torch.testing.assert_close(got.running_mean, want.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.running_var, want.running_var, rtol=0, atol=1e-12)
    assert int(got.num_batches_tracked) == int(want.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_standalone_deferred_batch_norm_updates_once_per_chunks_forwards_with_whole_batch_statistics(momentum):
    """Before the fix a standalone DeferredBatchNorm never updated its running statistics at all."""
    plain = nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    deferred = DeferredBatchNorm.convert_deferred_batch_norm(copy.deepcopy(plain), chunks=CHUNKS)
    untouched = copy.deepcopy(plain)
    for step in range(2):
        x = skewed_images(seed=step)
        plain(x)
        parts = x.chunk(CHUNKS)
        for part in parts[:-1]:
            deferred(part)
        assert_statistics_equal(deferred, untouched)  # nothing moves before the chunks-th forward
        deferred(parts[-1])
        assert_statistics_equal(deferred, plain)
        untouched = copy.deepcopy(plain)
    assert int(deferred.num_batches_tracked) == 2


@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_standalone_outputs_and_gradients_are_per_micro_batch_batch_norm(input_requires_grad):
    plain = nn.BatchNorm2d(3, dtype=torch.float64)
    deferred = DeferredBatchNorm.convert_deferred_batch_norm(copy.deepcopy(plain), chunks=CHUNKS)
    x1 = skewed_images().requires_grad_(input_requires_grad)
    x2 = x1.detach().clone().requires_grad_(input_requires_grad)
    out1, out2 = chunked(plain, x1), chunked(deferred, x2)
    torch.testing.assert_close(out2, out1, rtol=0, atol=1e-12)
    out1.pow(2).mean().backward()
    out2.pow(2).mean().backward()
    torch.testing.assert_close(deferred.weight.grad, plain.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(deferred.bias.grad, plain.bias.grad, rtol=0, atol=1e-12)
    if input_requires_grad:
        torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-12)
    # what it accumulates holds no graph (and no reference to the inputs' autograd history)
    deferred(x2[:4])
    assert deferred._standalone.mean is not None and deferred._standalone.mean.grad_fn is None


def test_standalone_eval_uses_the_running_statistics_like_plain_batch_norm():
    plain = nn.BatchNorm2d(3, dtype=torch.float64)
    deferred = DeferredBatchNorm.convert_deferred_batch_norm(copy.deepcopy(plain), chunks=CHUNKS)
    x = skewed_images()
    plain(x)
    chunked(deferred, x)
    plain.eval()
    deferred.eval()
    torch.testing.assert_close(deferred(x), plain(x), rtol=0, atol=1e-12)
    assert int(deferred.num_batches_tracked) == 1  # eval forwards count nothing


def test_convert_keeps_objects_sets_chunks_and_leaves_norms_without_running_statistics():
    untracked = nn.BatchNorm2d(3, track_running_stats=False)
    assert type(DeferredBatchNorm.convert_deferred_batch_norm(untracked, chunks=CHUNKS)) is nn.BatchNorm2d
    norm = DeferredBatchNorm(3, chunks=CHUNKS)
    assert norm.chunks == CHUNKS
    assert DeferredBatchNorm.convert_deferred_batch_norm(norm, chunks=CHUNKS) is norm
    assert convert_deferred_batch_norm(norm) is norm  # chunks=None keeps it (the classmethod defaults to 1)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    assert convert_deferred_batch_norm(model, chunks=2) is model and model[1].chunks == 2
    assert convert_deferred_batch_norm(model)[1].chunks == 2  # None keeps it
    with pytest.raises(ValueError, match=r"chunks = 0: DeferredBatchNorm needs .* an int >= 1"):
        DeferredBatchNorm(3, chunks=0)
    with pytest.raises(ValueError, match=r"chunks = 2.0"):
        convert_deferred_batch_norm(model, chunks=2.0)


def test_convert_deferred_batch_norm_returned_the_same_norm_for_another_chunks():
    """torchgpipe: converting a deferred norm to another ``chunks`` gives a new norm and leaves the one passed
    alone. The new one shares the parameters and running statistics (one optimizer trains both) and keeps
    its own cadence: 2 forwards per update against the original's 3, each the whole of its forwards' batch."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3).double()
    norm = DeferredBatchNorm.convert_deferred_batch_norm(copy.deepcopy(plain), chunks=3)
    twin = DeferredBatchNorm.convert_deferred_batch_norm(norm, chunks=2)
    assert twin is not norm and type(twin) is type(norm) and isinstance(twin, nn.BatchNorm2d)
    assert (norm.chunks, twin.chunks) == (3, 2)
    assert twin.weight is norm.weight and twin.bias is norm.bias and twin.running_mean is norm.running_mean
    assert convert_deferred_batch_norm(norm, chunks=2) is not norm and norm.chunks == 3  # the function too
    twin.register_buffer("extra", torch.zeros(1))
    assert "extra" not in dict(norm.named_buffers())  # containers of its own
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=g) * 3 + 1
    twin(x[:2])
    norm(x[:2])  # the original accumulates apart: one of its three
    assert int(norm.num_batches_tracked) == 0
    twin(x[2:])  # the twin's second: one update from all four rows
    plain(x)
    torch.testing.assert_close(twin.running_mean, plain.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(twin.running_var, plain.running_var, rtol=0, atol=1e-12)
    assert int(norm.num_batches_tracked) == 1  # shared buffers, as torchgpipe's conversion shares them


def test_pipeline_step_and_standalone_calls_do_not_mix():
    """Standalone calls pending when a pipeline step runs are neither applied nor dropped by it,
    and the step updates once from its own whole batch (3 micro-batches, whatever ``chunks`` says)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    reference = copy.deepcopy(model)
    convert_deferred_batch_norm(model, chunks=4)
    norm, plain = model[1], reference[1]
    g = torch.Generator().manual_seed(1)
    standalone = torch.randn(16, 4, dtype=torch.float64, generator=g) * 3 + 1
    batch = torch.randn(12, 4, dtype=torch.float64, generator=g) * 2 - 1
    targets = torch.randint(0, 2, (12,), generator=g)

    model(standalone[:4])  # two of four standalone forwards
    model(standalone[4:8])
    with Pipeline(model, schedule="1f1b", balance=[2, 2], chunks=3, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(batch, targets)
    reference(batch)  # the step: one update from its whole batch
    assert_statistics_equal(norm, plain)
    model(standalone[8:12])
    model(standalone[12:])  # the fourth standalone forward: one update from all four
    reference(standalone)
    assert_statistics_equal(norm, plain)
    assert int(norm.num_batches_tracked) == 2
