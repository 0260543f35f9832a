"""A stage may modify its input in place, as the same layer may in the un-pipelined model.

Each stage input is a fresh leaf (autograd is cut at every boundary), and
autograd forbids in-place ops on a leaf that requires grad; the stage
computes on a non-leaf alias (:mod:`pipesched.runtime.stage_input`). The
reference is always the plain model in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, reference_grads
from pipesched import Pipeline
from pipesched.runtime.stage_input import stage_leaf, stage_views
from pipesched.skip import pop, skippable, stash

# (schedule, ranks, balance): the in-place ReLU (layer 3) is the first layer of a stage in each
SCHEDULES = [
    ("gpipe", 2, [3, 2]),
    ("1f1b", 2, [3, 2]),
    ("zb-h1", 2, [3, 2]),
    ("zb-v", 2, [1, 2, 1, 1]),
    ("interleaved-1f1b", 2, [1, 2, 1, 1]),
]
POLICIES = ["never", "always", "except_last"]


class InplaceAffine(nn.Module):
    """An in-place op that is not idempotent: a recompute from the written input would show."""

    def forward(self, x):
        return x.mul_(1.5).add_(0.1)


FIRST_OPS = {"relu_": lambda: nn.ReLU(inplace=True), "mul_add_": InplaceAffine}


def inplace_model(first_op: str = "relu_") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), FIRST_OPS[first_op](), nn.Linear(12, 4),
    ).double()


def batch(rows: int = 10):
    g = torch.Generator().manual_seed(5)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (rows,), generator=g)


@pytest.mark.parametrize("first_op", FIRST_OPS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("schedule,ranks,balance", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_stage_starting_with_inplace_op(schedule, ranks, balance, policy, first_op):
    model = inplace_model(first_op)
    x, y = batch()
    loss_fn = nn.CrossEntropyLoss()
    ref_loss, ref_grads = reference_grads(model, loss_fn, x, y)
    with Pipeline(model, schedule=schedule, balance=balance, devices=["cpu"] * ranks, chunks=3,
                  checkpoint=policy, loss_fn=loss_fn) as pipe:
        assert any(type(next(iter(stage.children()))) is type(model[3]) for stage in pipe.stages)
        loss = pipe.step(x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref_grads)


def test_stage_starting_with_inplace_op_gives_input_gradients():
    """Without a loss: the caller's input gradient flows through an in-place op on the first stage's input."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Tanh(), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double()
    # the plain model's in-place ReLU acts on Linear's output; in the pipeline, on stage 1's input
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(6, 3, dtype=torch.float64)
    reference = copy.deepcopy(model)
    ref_x = x.detach().clone().requires_grad_()
    reference(ref_x).backward(grad_out)
    with Pipeline(model, schedule="gpipe", balance=[2, 2], devices=["cpu"] * 2, chunks=2, checkpoint="always") as pipe:
        out = pipe(x)
        out.backward(grad_out)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=1e-12)
    assert_grads_equal(model, [p.grad for p in reference.parameters()])


@skippable(stash=["skip"])
class _Stash(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        yield stash("skip", y)
        return torch.tanh(y)


@skippable(pop=["skip"])
class _PopInPlace(nn.Module):
    """Its first op on the popped skip tensor (a received leaf in the pipeline) is in place."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        skip = yield pop("skip")
        return self.lin(x) + skip.relu_()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_stage_starting_with_inplace_op_on_a_popped_skip_tensor(schedule, policy):
    torch.manual_seed(2)
    model = nn.Sequential(_Stash(), nn.Linear(8, 8), nn.Tanh(), _PopInPlace(), nn.Linear(8, 4)).double()
    x, y = batch(9)
    loss_fn = nn.CrossEntropyLoss()
    ref_loss, ref_grads = reference_grads(model, loss_fn, x, y)
    with Pipeline(model, schedule=schedule, balance=[1, 2, 2], devices=["cpu"] * 3, chunks=3,
                  checkpoint=policy, loss_fn=loss_fn) as pipe:
        loss = pipe.step(x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    assert_grads_equal(model, ref_grads)


def test_stage_views_let_autograd_record_an_inplace_op_and_reach_the_leaf():
    leaf = stage_leaf(torch.tensor([-1.0, 2.0], dtype=torch.float64), wants_grad=True)
    (view,) = stage_views((leaf,))
    assert leaf.is_leaf and not view.is_leaf and view._base is None
    assert view.data_ptr() == leaf.data_ptr()  # an alias, not a copy
    view.relu_().sum().backward()
    torch.testing.assert_close(leaf.grad, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_stage_leaf_keeps_a_callers_tensor_and_reuses_an_owned_one():
    caller = torch.ones(3)
    leaf = stage_leaf(caller, wants_grad=True)
    assert leaf is not caller and not caller.requires_grad and leaf.requires_grad
    received = torch.ones(3)
    assert stage_leaf(received, wants_grad=True, owned=True) is received
    tokens = torch.arange(3)
    assert not stage_leaf(tokens, wants_grad=True).requires_grad  # integers have no gradient


def test_profiling_a_layer_that_starts_with_an_inplace_op():
    """``tune`` times each layer on a leaf of its own: an in-place layer must run there too."""
    import pipesched

    x, y = batch()
    profile = pipesched.profile(inplace_model(), x, y, nn.CrossEntropyLoss(), repeat=1)
    assert len(profile.layers) == 5


def test_checkpointed_stage_that_writes_into_its_input_leaves_the_held_input_as_received():
    """The held input's data is shared (the sender's output, maybe the next stage's input), and the
    recompute needs it as it was: neither the checkpointed first run nor the recompute writes into it."""
    from pipesched.runtime.stage_input import on_stage_views

    stage = nn.Identity()
    data = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    version = data._version
    run = on_stage_views(lambda inputs: inputs[0].mul_(3.0), stage, 1, checkpointing=lambda: True)
    with torch.no_grad():  # a checkpointed first run
        first = run((stage_leaf(data, wants_grad=True),))
    leaf = stage_leaf(data, wants_grad=True)
    recomputed = run((leaf,))
    recomputed.sum().backward()
    assert data._version == version
    torch.testing.assert_close(recomputed.detach(), first)
    torch.testing.assert_close(leaf.grad, torch.full((2,), 3.0, dtype=torch.float64))


def test_stage_writing_into_its_input_only_sometimes_under_checkpointing_is_refused():
    from pipesched.runtime.stage_input import on_stage_views

    stage, calls = nn.Identity(), []

    def sometimes(inputs):
        calls.append(None)
        return inputs[0].mul_(3.0) if len(calls) > 1 else inputs[0] * 3.0

    with torch.no_grad():
        on_stage_views(sometimes, stage, 1, checkpointing=lambda: True)((stage_leaf(torch.ones(2), True),))
        with pytest.raises(RuntimeError, match=r"stage 1 wrote into its input 0 in place.*inplace=False"):
            on_stage_views(sometimes, stage, 1, checkpointing=lambda: True)((stage_leaf(torch.ones(2), True),))


def test_stage_starting_with_inplace_op_under_inference_mode():
    """Inference tensors have no version counter: the check for a write into the input must not ask them."""
    model = inplace_model()
    x, _ = batch()
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
    with Pipeline(model, schedule="gpipe", balance=[3, 2], devices=["cpu"] * 2, chunks=3) as pipe:
        with torch.inference_mode():
            out = pipe(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
