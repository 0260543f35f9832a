"""Deferred batch norm: running statistics equal the un-pipelined full batch's after each step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipesched import DeferredBatchNorm, Pipeline, convert_deferred_batch_norm, is_recomputing


def bn1d_model(momentum=0.1):
    """One batch norm: its inputs are the same as in the plain model, so its statistics must be."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=momentum), nn.ReLU(),
                         nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def bn2d_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 5 * 5, 4)).double()


def norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def assert_same_statistics(model, reference):
    for got, want in zip(norms(model), norms(reference)):
        torch.testing.assert_close(got.running_mean, want.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(got.running_var, want.running_var, rtol=0, atol=1e-12)
        assert int(got.num_batches_tracked) == int(want.num_batches_tracked)


def run_reference(model, batches, loss_fn):
    reference = copy.deepcopy(model)
    for x, y in batches:
        loss_fn(reference(x), y).backward()
    return reference


def batches_1d(count, rows=12):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(rows, 8, dtype=torch.float64, generator=g) * 3 + 1,
             torch.randint(0, 4, (rows,), generator=g)) for _ in range(count)]


@pytest.mark.parametrize("schedule,balance", [("gpipe", [2, 4]), ("1f1b", [3, 3]),
                                              ("interleaved", [1, 1, 2, 2])])
@pytest.mark.parametrize("policy", ["never", "always", "except_last"])
@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_running_statistics_equal_full_batch(schedule, balance, policy, chunks):
    model = bn1d_model()
    data = batches_1d(2)
    reference = run_reference(model, data, nn.CrossEntropyLoss())
    with Pipeline(model, schedule=schedule, balance=balance, chunks=chunks, checkpoint=policy,
                  deferred_batch_norm=True, loss_fn=nn.CrossEntropyLoss()) as pipe:
        for x, y in data:
            pipe.step(x, y)
    assert all(isinstance(m, DeferredBatchNorm) for m in norms(model))
    assert_same_statistics(model, reference)
    assert int(norms(model)[0].num_batches_tracked) == 2  # once per step, not per micro-batch


@pytest.mark.parametrize("schedule,balance", [("gpipe", [3, 3]), ("1f1b", [3, 3])])
def test_deeper_norm_updates_from_the_whole_batch_of_its_own_inputs(schedule, balance):
    """A norm behind another sees per-micro-batch-normalised inputs (unavoidable in a pipeline),
    so its statistics cannot match the plain model's; they must be the full-batch statistics of
    exactly the inputs it received, applied once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                          nn.BatchNorm1d(16, momentum=0.25), nn.Linear(16, 4)).double()
    seen = []
    x, y = batches_1d(1)[0]
    with Pipeline(model, schedule=schedule, balance=balance, chunks=4, checkpoint="always",
                  deferred_batch_norm=True, loss_fn=nn.CrossEntropyLoss()) as pipe:
        model[4].register_forward_pre_hook(
            lambda m, args: None if is_recomputing() else seen.append(args[0].detach()))
        pipe.step(x, y)
    inputs = torch.cat(seen)
    assert inputs.shape[0] == 12  # each row once: recomputes are not counted
    expected_mean = 0.75 * torch.zeros(16, dtype=torch.float64) + 0.25 * inputs.mean(0)
    expected_var = 0.75 * torch.ones(16, dtype=torch.float64) + 0.25 * inputs.var(0, unbiased=True)
    torch.testing.assert_close(model[4].running_mean, expected_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(model[4].running_var, expected_var, rtol=0, atol=1e-12)
    assert int(model[4].num_batches_tracked) == 1


def test_cumulative_average_momentum_none():
    model = bn1d_model(momentum=None)
    data = batches_1d(3)
    reference = run_reference(model, data, nn.CrossEntropyLoss())
    with Pipeline(model, schedule="1f1b", balance=[3, 3], chunks=4, deferred_batch_norm=True,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        for x, y in data:
            pipe.step(x, y)
    assert_same_statistics(model, reference)


def test_conv_batch_norm_with_fewer_rows_than_chunks():
    """3 rows, chunks=8: three one-row micro-batches; the update still sees all three rows."""
    model = bn2d_model()
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(3, 3, 5, 5, dtype=torch.float64, generator=g), torch.randint(0, 4, (3,), generator=g))]
    reference = run_reference(model, data, nn.CrossEntropyLoss())
    with Pipeline(model, schedule="gpipe", balance=[3, 4], chunks=8, checkpoint="always",
                  deferred_batch_norm=True, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(*data[0])
        assert pipe.last_report.num_microbatches == 3
    assert_same_statistics(model, reference)


def test_plain_batch_norm_would_drift():
    """Why the option exists: without it, statistics move once per micro-batch."""
    model = bn1d_model()
    data = batches_1d(1)
    reference = run_reference(model, data, nn.CrossEntropyLoss())
    with Pipeline(model, schedule="1f1b", balance=[3, 3], chunks=3, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(*data[0])
    assert int(norms(model)[0].num_batches_tracked) == 3  # 3 forwards; recomputes leave it alone
    assert not torch.allclose(norms(model)[0].running_var, norms(reference)[0].running_var)


def test_failed_step_leaves_statistics_untouched():
    model = bn1d_model()
    data = batches_1d(1)

    class Boom(nn.Module):
        armed = True

        def forward(self, x):
            if self.armed:
                raise RuntimeError("boom")
            return x

    boom = Boom()
    model.append(boom)
    reference = copy.deepcopy(model)
    reference[-1].armed = False
    reference = run_reference(reference, data, nn.CrossEntropyLoss())
    with Pipeline(model, schedule="1f1b", balance=[3, 4], chunks=3, deferred_batch_norm=True,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        before = copy.deepcopy([(m.running_mean, m.running_var, m.num_batches_tracked) for m in norms(model)])
        with pytest.raises(RuntimeError):
            pipe.step(*data[0])
        for m, (mean, var, tracked) in zip(norms(model), before):
            assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
            assert torch.equal(m.num_batches_tracked, tracked)
        boom.armed = False
        pipe.step(*data[0])  # nothing left over from the failed step
    assert_same_statistics(model, reference)


def test_eval_mode_uses_running_statistics_and_updates_nothing():
    model = bn1d_model()
    with Pipeline(model, balance=[3, 3], chunks=3, deferred_batch_norm=True) as pipe:
        pipe(batches_1d(1)[0][0])  # train-mode forward: one update
        model.eval()
        expected = model(batches_1d(1)[0][0])
        state = copy.deepcopy(norms(model)[0].state_dict())
        with torch.no_grad():
            out = pipe(batches_1d(1)[0][0])
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=1e-12)
    for key, value in norms(model)[0].state_dict().items():
        assert torch.equal(value, state[key])


def test_is_recomputing_is_true_only_during_recompute():
    seen: list[tuple[bool, bool]] = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((torch.is_grad_enabled(), is_recomputing()))
            return x

    model = nn.Sequential(nn.Linear(4, 4), Probe(), nn.Linear(4, 4))
    with Pipeline(model, balance=[2, 1], chunks=2, checkpoint="always", loss_fn=nn.MSELoss()) as pipe:
        pipe.step(torch.randn(4, 4), torch.randn(4, 4))
    assert sorted(seen) == [(False, False), (False, False), (True, True), (True, True)]
    assert not is_recomputing()


def test_convert_keeps_state_dtype_and_nesting():
    inner = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, eps=1e-3, momentum=0.3))
    model = nn.Sequential(inner, nn.BatchNorm1d(4, affine=False)).double()
    model[0][1].running_mean.fill_(0.5)
    first, second = model[0][1], model[1]
    converted = convert_deferred_batch_norm(model)
    assert converted is model
    assert model[0][1] is first and model[1] is second  # converted in place, not replaced
    assert isinstance(first, DeferredBatchNorm) and isinstance(second, DeferredBatchNorm)
    assert first.eps == 1e-3 and first.momentum == 0.3 and first.weight.dtype == torch.float64
    assert torch.equal(first.running_mean, torch.full((4,), 0.5, dtype=torch.float64))
    assert second.weight is None and second.running_var.dtype == torch.float64


def test_convert_replaces_a_repeated_batch_norm_at_every_position():
    """named_children() listed a repeated batch norm once: its second position kept the old module."""
    norm = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), norm, nn.Tanh(), norm, nn.Sequential(norm))
    convert_deferred_batch_norm(model)
    assert isinstance(model[1], DeferredBatchNorm)
    assert model[3] is model[1] and model[4][0] is model[1]  # still one module, as before


def test_optimizer_built_before_pipeline_keeps_training_converted_batch_norm():
    """deferred_batch_norm=True used to replace the norms by new modules with new Parameters:
    an optimizer built before the Pipeline (the usual order) silently stopped training them."""
    model = bn2d_model()
    bn = model[1]
    weight, bias = bn.weight, bn.bias
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = weight.detach().clone()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 3, 5, 5, dtype=torch.float64, generator=g), torch.randint(0, 4, (6,), generator=g)
    with Pipeline(model, schedule="1f1b", balance=[3, 4], chunks=2, deferred_batch_norm=True,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
        optimizer.step()
    assert model[1] is bn and bn.weight is weight and bn.bias is bias
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    torch.testing.assert_close(weight.detach(), before - 0.5 * weight.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
def test_converted_batch_norm_is_still_its_original_class(kind):
    """User code picks batch norms out by class (weight-decay groups, freezing); the
    pipelines pick deferred ones out by DeferredBatchNorm. Both must hold, and hooks survive."""
    norm = kind(4).double()
    calls = []
    norm.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    model = nn.Sequential(norm)
    convert_deferred_batch_norm(model)
    assert model[0] is norm
    assert isinstance(norm, kind) and isinstance(norm, DeferredBatchNorm)
    assert isinstance(norm, nn.modules.batchnorm._BatchNorm)
    dims = {nn.BatchNorm1d: (6, 4), nn.BatchNorm2d: (6, 4, 2, 2), nn.BatchNorm3d: (6, 4, 2, 2, 2)}[kind]
    norm(torch.randn(*dims, dtype=torch.float64))
    assert calls == [torch.Size(dims)]
    with pytest.raises(ValueError, match="expected"):  # the original class's input check is kept
        norm(torch.randn(6, 4, *([2] * (len(dims) - 1)), 2, dtype=torch.float64))
    norm.commit()
    assert int(norm.num_batches_tracked) == 1


def test_converting_a_batch_norm_subclass_keeps_the_subclass():
    class MyNorm(nn.BatchNorm1d):
        pass

    norm = MyNorm(4)
    convert_deferred_batch_norm(nn.Sequential(norm))
    assert isinstance(norm, MyNorm) and isinstance(norm, DeferredBatchNorm)
    assert type(norm) is type(convert_deferred_batch_norm(MyNorm(4)))  # one class per original


def instance_norm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Unflatten(1, (4, 4)),
                         nn.InstanceNorm1d(4, track_running_stats=True, momentum=0.2), nn.Flatten(),
                         nn.Tanh(), nn.Linear(16, 4)).double()


def running_stats(model):
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


@pytest.mark.parametrize("policy", ["always", "except_last", "never", lambda stage, mb: mb % 2 == 0])
@pytest.mark.parametrize("schedule,balance", [("gpipe", [3, 3]), ("1f1b", [2, 4]),
                                              ("interleaved", [1, 2, 1, 2])])
@pytest.mark.parametrize("make_model", [bn1d_model, instance_norm_model])
def test_recompute_does_not_update_plain_batch_norm_statistics_twice(policy, schedule, balance, make_model):
    """A checkpointed micro-batch used to move a plain norm's running statistics again while
    recomputing (num_batches_tracked 7 instead of 4 at chunks 4). Now they equal what the
    same micro-batch forwards give without any recompute."""
    model = make_model()
    x, y = batches_1d(1)[0]
    reference = copy.deepcopy(model)
    for part in torch.tensor_split(x, 4):
        reference(part)
    with Pipeline(model, schedule=schedule, balance=balance, chunks=4, checkpoint=policy,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
    for (mean, var, tracked), (want_mean, want_var, want_tracked) in zip(running_stats(model),
                                                                          running_stats(reference)):
        assert int(tracked) == int(want_tracked)  # 4 for batch norm; instance norm counts nothing
        assert not torch.equal(want_mean, torch.zeros_like(want_mean))  # the forwards did move them
        torch.testing.assert_close(mean, want_mean, rtol=0, atol=0)
        torch.testing.assert_close(var, want_var, rtol=0, atol=0)
