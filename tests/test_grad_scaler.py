"""``pipe.step(x, y, scaler=GradScaler)``: float16 loss scaling where the pipeline's backward runs.

torch's recipe ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``
cannot be written around ``step()``, which runs the backward itself; before
``scaler=`` a pipeline could not train in float16 with loss scaling at all.
Checked against the un-pipelined model in float64: the scales are powers of
two, so scaled gradients are exact and training runs match bit for bit in
what the scaler decides (skip, back off, grow).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Pipeline

SCALE = 2.0**10


def batch(rows: int = 12, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (rows,), generator=g)


def scaler(**options) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=SCALE, **options)


@pytest.mark.parametrize("schedule,balance", [
    ("gpipe", [3, 3]), ("1f1b", [2, 2, 2]), ("interleaved-1f1b", [2, 1, 1, 2]), ("zb-h1", [3, 3]), ("zb-v", [2, 1, 1, 2]),
])
@pytest.mark.parametrize("policy", ["never", "always"])
def test_step_with_a_scaler_gives_the_scaled_gradients_and_the_unscaled_loss(schedule, balance, policy):
    model = mlp(layers=6)
    x, y = batch()
    ref_loss, expected = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    x.requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    nn.CrossEntropyLoss()(copy.deepcopy(model)(ref_x), y).backward()
    ranks = 3 if schedule == "1f1b" else 2
    with Pipeline(model, schedule=schedule, balance=balance, devices=["cpu"] * ranks, chunks=4, checkpoint=policy,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        loss = pipe.step(x, y, scaler=scaler())
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)  # not scaled
    assert_grads_equal(model, [g * SCALE for g in expected], atol=1e-12 * SCALE)
    torch.testing.assert_close(x.grad, ref_x.grad * SCALE, rtol=0, atol=1e-12 * SCALE)  # the input's too


def test_training_with_a_scaler_matches_the_unpipelined_recipe_step_for_step():
    """Scale growth every step, and a batch whose loss is not finite: both skip it and back off alike."""
    model = mlp(layers=6)
    plain = copy.deepcopy(model)
    ours, theirs = scaler(growth_interval=1), scaler(growth_interval=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    batches = [batch(seed=s) for s in range(4)]
    poisoned = batch(seed=9)
    poisoned[0][3, 2] = float("inf")  # one non-finite input: infinite gradients
    batches.insert(2, poisoned)
    scales = []
    with Pipeline(model, schedule="1f1b", balance=[2, 2, 2], devices=["cpu"] * 3, chunks=4,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            pipe.step(x, y, scaler=ours)
            ours.step(optimizer)
            ours.update()
            plain_optimizer.zero_grad(set_to_none=True)
            theirs.scale(nn.CrossEntropyLoss()(plain(x), y)).backward()
            theirs.step(plain_optimizer)
            theirs.update()
            scales.append((ours.get_scale(), theirs.get_scale()))
    assert [a for a, _ in scales] == [b for _, b in scales]
    assert scales[2][0] < scales[1][0]  # the poisoned step backed off (and was skipped)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_a_disabled_scaler_scales_nothing_as_in_torch():
    model = mlp(layers=6)
    x, y = batch()
    _, expected = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    with Pipeline(model, balance=[3, 3], devices=["cpu", "cpu"], chunks=4, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y, scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert_grads_equal(model, expected)


def test_a_scaler_that_is_not_a_grad_scaler_is_refused_naming_the_fix():
    model = mlp(layers=6)
    x, y = batch()
    with Pipeline(model, balance=[3, 3], devices=["cpu", "cpu"], chunks=4, loss_fn=nn.CrossEntropyLoss()) as pipe:
        with pytest.raises(TypeError, match=r"scaler must be a torch.amp.GradScaler or None, got float; "
                                            r"e.g. scaler = torch.amp.GradScaler\('cuda'\)"):
            pipe.step(x, y, scaler=1024.0)
        pipe.step(x, y)  # nothing ran: the pipeline is fine
    assert all(p.grad is not None for p in model.parameters())


def test_distributed_pipeline_step_takes_a_scaler_too(one_process_group):
    """Its processes' scalers agree on skipping (tests/test_distributed.py); here the scaled gradients."""
    from pipesched.distributed import DistributedPipeline

    model = mlp(layers=6)
    x, y = batch()
    ref_loss, expected = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    with DistributedPipeline(model, chunks=2, loss_fn=nn.CrossEntropyLoss()) as pipe:
        loss = pipe.step(x, y, scaler=scaler())
        with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler or None, got str"):
            pipe.step(x, y, scaler="fp16")
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert_grads_equal(model, [g * SCALE for g in expected], atol=1e-12 * SCALE)


def test_gpipe_takes_torchs_recipe_as_is():
    """pipesched.GPipe (torchgpipe's interface) returns the output, so scaler.scale(loss).backward() works as in torch."""
    from pipesched import GPipe

    model = mlp(layers=6)
    x, y = batch()
    _, expected = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    gpipe = GPipe(model, balance=[3, 3], devices=["cpu", "cpu"], chunks=4)
    try:
        scaler().scale(nn.CrossEntropyLoss()(gpipe(x), y)).backward()
    finally:
        gpipe.close()
    assert_grads_equal(model, [g * SCALE for g in expected], atol=1e-12 * SCALE)
