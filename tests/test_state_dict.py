"""A pipeline's state dict is the model's: checkpoints move between pipelines and the plain model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_grads_equal, reference_grads
from torch import nn

from pipesched import Pipeline


def bn_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 12),
                         nn.Tanh(), nn.Linear(12, 4)).double()


def data(rows: int = 10):
    g = torch.Generator().manual_seed(3)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (rows,), generator=g)


def assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def trained_state() -> dict:
    """The state of a pipeline after one step, so buffers and weights differ from a fresh model."""
    model = bn_model(seed=1)
    with Pipeline(model, schedule="1f1b", balance=[3, 3], chunks=2, deferred_batch_norm=True,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(*data())
        with torch.no_grad():
            for param in model.parameters():
                param.sub_(0.1 * param.grad)
        return pipe.state_dict()


def test_pipeline_state_dict_keys_have_no_module_prefix():
    """pipe.state_dict() used to carry a 'module.' prefix: a checkpoint saved from the pipeline
    did not load into the plain model."""
    model = bn_model()
    with Pipeline(model, balance=[2, 4], loss_fn=nn.CrossEntropyLoss(weight=torch.ones(4).double())) as pipe:
        state = pipe.state_dict()
        assert_same_state(state, model.state_dict())
        assert state._metadata == model.state_dict()._metadata
        kept = pipe.state_dict(keep_vars=True)
        assert kept["0.weight"] is model[0].weight


def test_checkpoint_moves_from_1f1b_pipe_to_gpipe_pipe_and_plain_model():
    saved = trained_state()
    x, y = data()

    plain = bn_model(seed=2)
    plain.load_state_dict(saved)
    assert_same_state(plain.state_dict(), saved)

    other = bn_model(seed=3)
    with Pipeline(other, schedule="gpipe", balance=[2, 2, 2], chunks=1,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        result = pipe.load_state_dict(saved)
        assert not result.missing_keys and not result.unexpected_keys
        assert_same_state(other.state_dict(), saved)
        _, expected = reference_grads(plain, nn.CrossEntropyLoss(), x, y)
        pipe.step(x, y)  # chunks=1: the batch norm sees the whole batch, as the plain model does
    assert_grads_equal(other, expected)


def test_plain_model_checkpoint_loads_into_pipe():
    source = bn_model(seed=4)
    source(data()[0])  # move the running statistics off their initial values
    target = bn_model(seed=5)
    with Pipeline(target, schedule="1f1b", balance=[3, 3], chunks=2, deferred_batch_norm=True) as pipe:
        pipe.load_state_dict(source.state_dict())
        assert_same_state(pipe.state_dict(), source.state_dict())
        assert_same_state(target.state_dict(), source.state_dict())


def test_strict_loading_is_the_models():
    model = bn_model()
    with Pipeline(model, balance=[3, 3]) as pipe:
        state = model.state_dict()
        missing = {k: v for k, v in state.items() if k != "3.bias"}
        extra = {**state, "9.weight": torch.zeros(1)}
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"3.bias\""):
            pipe.load_state_dict(missing)
        with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"9.weight\""):
            pipe.load_state_dict(extra)
        assert pipe.load_state_dict(missing, strict=False) == copy.deepcopy(model).load_state_dict(missing, strict=False)
        assert pipe.load_state_dict(extra, strict=False).unexpected_keys == ["9.weight"]
        with pytest.raises(RuntimeError, match="Unexpected key"):
            pipe.load_state_dict({f"module.{k}": v for k, v in state.items()})


def test_module_holding_a_pipeline_saves_and_loads_model_keys():
    """torch saves a child through its state_dict() but loads it by walking its submodules."""

    class Trainer(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.pipe = Pipeline(model, balance=[3, 3],
                                 loss_fn=nn.CrossEntropyLoss(weight=torch.arange(1.0, 5.0).double()))

    saved = trained_state()
    first = Trainer(bn_model(seed=6))
    first.pipe.load_state_dict(saved)
    state = first.state_dict()
    assert list(state) == [f"pipe.{k}" for k in saved]
    second = Trainer(bn_model(seed=7))
    second.load_state_dict(state)  # strict
    assert_same_state(second.pipe.state_dict(), saved)
    assert torch.equal(second.pipe.loss_fn.weight, torch.arange(1.0, 5.0).double())  # untouched
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"pipe.9.weight\""):
        second.load_state_dict({**state, "pipe.9.weight": torch.zeros(1)})
    first.pipe.close()
    second.pipe.close()
