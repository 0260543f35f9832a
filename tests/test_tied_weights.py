"""Weights tied across devices in one process: a replica per device, gradients summed into the owner.

``devices=["cpu:0", "cpu:1"]`` are two devices to pipesched (and to torch), so
these tests run the very path two GPUs take: each device other than the
owner's computes with its own replica, refreshed every step, and the
replicas' gradients are summed into the owner's ``.grad``. The reference is
always the un-pipelined float64 model (``copy.deepcopy`` keeps the ties).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, reference_grads
from pipesched import Pipeline
from pipesched.plan.registry import schedules_for
from tied_models import gpt_balance, gpt_like, token_loss, tokens

TWO_DEVICES = ["cpu:0", "cpu:1"]
X, Y = tokens()
X2, Y2 = tokens(seed=5)


def sgd_reference(model: nn.Sequential, batches, lr: float = 0.5) -> list[list[torch.Tensor]]:
    """The plain model's gradients at each step of plain SGD over ``batches``."""
    ref = copy.deepcopy(model)
    optimizer = torch.optim.SGD(ref.parameters(), lr=lr)
    grads = []
    for x, y in batches:
        optimizer.zero_grad()
        token_loss(ref(x), y).backward()
        grads.append([p.grad.clone() for p in ref.parameters()])
        optimizer.step()
    return grads


@pytest.mark.parametrize("schedule,stages", schedules_for(2), ids=[name for name, _ in schedules_for(2)])
def test_tied_gpt_gradients_equal_unpipelined_under_every_schedule_after_optimizer_steps(schedule, stages):
    """Two SGD steps: the second must compute with the owner's *updated* value on every device."""
    model = gpt_like(6)
    expected = sgd_reference(model, [(X, Y), (X2, Y2)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # built before the pipeline: owners only
    with Pipeline(model, schedule=schedule, balance=gpt_balance(6, stages), devices=TWO_DEVICES, chunks=4,
                  loss_fn=token_loss) as pipe:
        for (x, y), want in zip([(X, Y), (X2, Y2)], expected):
            optimizer.zero_grad()
            pipe.step(x, y)
            assert_grads_equal(model, want)
            optimizer.step()
    assert model[0].weight is model[-1].proj.weight  # still one tensor, the user's
    assert model[1].up.weight is model[2].up.weight


@pytest.mark.parametrize("policy", ["always", "never", lambda stage, mb: mb % 2 == 1])
def test_tied_replicas_under_every_checkpoint_policy_give_unpipelined_gradients(policy):
    """A recompute runs with the replica the first run used (and W of a split backward reaches it)."""
    model = gpt_like(6)
    old = [torch.full_like(p, 0.25) for p in model.parameters()]
    for param, grad in zip(model.parameters(), old):
        param.grad = grad.clone()
    loss_ref, ref = reference_grads(model, token_loss, X, Y)
    for schedule in ["1f1b", "zb-h1"]:
        for param, grad in zip(model.parameters(), old):
            param.grad = grad.clone()
        with Pipeline(model, schedule=schedule, balance=[2, 4], devices=TWO_DEVICES, chunks=3,
                      checkpoint=policy, loss_fn=token_loss) as pipe:
            loss = pipe.step(X, Y)
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
        assert_grads_equal(model, [o + g for o, g in zip(old, ref)])  # old gradient kept, added once


def test_tied_replicas_with_forward_then_loss_backward():
    """``loss_fn(pipe(x), y).backward()``: the backward half reuses its forward's replicas."""
    model = gpt_like(6)
    loss_ref, ref = reference_grads(model, token_loss, X, Y)
    with Pipeline(model, schedule="gpipe", balance=[2, 4], devices=TWO_DEVICES, chunks=3) as pipe:
        loss = token_loss(pipe(X), Y)
        loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref)


class FailOnce(nn.Module):
    """Raises on its first call while armed (on the replica's device, after a replica was used)."""

    def __init__(self):
        super().__init__()
        self.armed = True

    def forward(self, x):
        if self.armed:
            self.armed = False
            raise ValueError("injected failure")
        return x


def test_failed_step_with_tied_replicas_leaves_grad_untouched_and_next_step_exact():
    """The replicas' partial gradients of a failed step must not leak into the next step."""
    model = gpt_like(6)
    layers = list(model)
    failing = nn.Sequential(*layers[:4], FailOnce(), *layers[4:])
    loss_ref, ref = reference_grads(model, token_loss, X, Y)
    with Pipeline(failing, schedule="1f1b", balance=[2, 5], devices=TWO_DEVICES, chunks=3,
                  loss_fn=token_loss) as pipe:
        with pytest.raises(ValueError, match="injected failure"):
            pipe.step(X, Y)
        assert all(p.grad is None for p in model.parameters())
        loss = pipe.step(X, Y)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref)


def test_replicas_are_not_counted_as_activation_bytes():
    """The memory meter excludes parameters; a replica is one, so both layouts report the same peaks."""
    peaks = {}
    for devices in (["cpu", "cpu"], TWO_DEVICES):
        with Pipeline(gpt_like(6), schedule="1f1b", balance=[2, 4], devices=devices, chunks=3,
                      checkpoint="never", loss_fn=token_loss) as pipe:
            pipe.step(X, Y)
            peaks[tuple(devices)] = pipe.last_report.peak_activation_bytes
    assert peaks[("cpu", "cpu")] == peaks[tuple(TWO_DEVICES)]


def test_tied_weight_state_dict_and_outside_steps_the_model_is_untouched():
    model = gpt_like(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with Pipeline(model, schedule="1f1b", balance=[2, 4], devices=TWO_DEVICES, chunks=2,
                  loss_fn=token_loss) as pipe:
        pipe.step(X, Y)
        assert list(pipe.state_dict()) == list(before)
        assert {id(p) for p in pipe.parameters()} == {id(p) for p in model.parameters()}
        with torch.no_grad():
            torch.testing.assert_close(pipe(X), model(X), rtol=0, atol=1e-12)


def test_layer_object_repeated_on_two_devices_is_refused_naming_it_and_the_fix():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh()).double()
    with pytest.raises(ValueError) as info:
        Pipeline(model, balance=[2, 2], devices=TWO_DEVICES)
    message = str(info.value)
    assert "layer '0' = '2' (one Linear object) is used by stage 0 (rank 0, cpu:0), stage 1 (rank 1, cpu:1)" \
        in message
    assert "twin = copy.deepcopy(layer); twin.weight = layer.weight; twin.bias = layer.bias" in message
    # the fix works: a twin layer with tied parameters is replicated
    twin = copy.deepcopy(lin)
    twin.weight, twin.bias = lin.weight, lin.bias
    fixed = nn.Sequential(lin, nn.Tanh(), twin, nn.Tanh())
    x = torch.randn(6, 4, dtype=torch.float64)
    _, ref = reference_grads(fixed, lambda out, _: out.square().mean(), x, x)
    with Pipeline(fixed, balance=[2, 2], devices=TWO_DEVICES, chunks=2,
                  loss_fn=lambda out, _: out.square().mean()) as pipe:
        pipe.step(x, x)
    assert_grads_equal(fixed, ref)
    # the same layer on one device shares it directly
    Pipeline(model, balance=[2, 2], devices=["cpu", "cpu"]).close()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("devices", [["cuda:0", "cpu"], ["cpu", "cuda:0"], ["cuda:0", "cuda:1"]])
@pytest.mark.parametrize("schedule,stages", [("1f1b", 2), ("interleaved-1f1b", 4), ("zb-v", 4)])
def test_tied_gpt_on_cuda_gives_unpipelined_gradients_after_optimizer_steps(devices, schedule, stages):
    if any((torch.device(d).index or 0) >= torch.cuda.device_count() for d in devices if d.startswith("cuda")):
        pytest.skip("needs two CUDA devices")
    model = gpt_like(6)
    expected = sgd_reference(model, [(X, Y), (X2, Y2)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with Pipeline(model, schedule=schedule, balance=gpt_balance(6, stages), devices=devices, chunks=4,
                  loss_fn=token_loss) as pipe:
        assert model[0].weight.device.type == torch.device(devices[0]).type  # the owner: stage 0's device
        for (x, y), want in zip([(X, Y), (X2, Y2)], expected):
            optimizer.zero_grad()
            pipe.step(x, y)
            torch.cuda.synchronize()
            assert_grads_equal(model, [g.to(p.device) for g, p in zip(want, model.parameters())], atol=1e-10)
            optimizer.step()


def test_tied_weights_on_shared_device_rerun_bit_identical():
    """Two ranks on one device each use the tied weight: their gradients must not be added into the
    one ``.grad`` in whatever order their threads happen to run (docs/guide/shared-layers-and-skips.md promises bit-identical
    reruns); every rerun of the same step gives the same bits, and the plain model's gradients."""
    model = gpt_like(6)
    x, y = tokens(rows=16, seed=3)
    loss_ref, ref = reference_grads(model, token_loss, x, y)
    seen = set()
    with Pipeline(model, schedule="1f1b", balance=[2, 4], devices=["cpu", "cpu"], chunks=8,
                  loss_fn=token_loss) as pipe:
        for _ in range(12):
            for param in model.parameters():
                param.grad = None
            loss = pipe.step(x, y)
            seen.add(tuple(p.grad.numpy().tobytes() for p in model.parameters()))
            torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-12)
            assert_grads_equal(model, ref)
    assert len(seen) == 1, f"12 reruns of one step gave {len(seen)} different sets of gradients"
