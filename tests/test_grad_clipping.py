"""``pipe.clip_grad_norm_``: torch's clipping by the whole model's gradient norm, for both pipelines.

Multi-process runs (2 and 4 gloo processes, a weight tied across them) are in
tests/test_distributed.py; here one process, against torch's own function
on the un-pipelined model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import mlp
from pipesched import Pipeline


def batch(rows: int = 12):
    g = torch.Generator().manual_seed(6)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (rows,), generator=g)


def clipped_reference(model: nn.Module, x, y, max_norm: float, norm_type: float):
    ref = copy.deepcopy(model)
    nn.CrossEntropyLoss()(ref(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
    return norm, [p.grad for p in ref.parameters()]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_pipeline_clips_every_devices_gradients_by_the_models_norm(norm_type):
    model = mlp(layers=6)
    x, y = batch()
    norm, expected = clipped_reference(model, x, y, 0.1, norm_type)
    with Pipeline(model, schedule="1f1b", balance=[2, 2, 2], devices=["cpu:0", "cpu:1", "cpu:2"], chunks=4,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
        got = pipe.clip_grad_norm_(0.1, norm_type)
    torch.testing.assert_close(got, norm, rtol=1e-12, atol=0)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-14)


@pytest.mark.parametrize("norm_type", [2.0, float("inf"), "inf"])
def test_distributed_pipeline_on_one_process_clips_as_torch_does(one_process_group, norm_type):
    from pipesched.distributed import DistributedPipeline

    model = mlp(layers=6)
    x, y = batch()
    norm, expected = clipped_reference(model, x, y, 0.1, float(norm_type))
    with DistributedPipeline(model, chunks=3, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
        got = pipe.clip_grad_norm_(0.1, norm_type)
    assert abs(float(got) - float(norm)) <= 1e-12 * float(norm)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-14)


def test_distributed_clipping_refuses_bad_arguments_naming_them(one_process_group):
    from pipesched.distributed import DistributedPipeline

    x, y = batch()
    with DistributedPipeline(mlp(layers=6), chunks=3, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
        with pytest.raises(ValueError, match=r"max_norm must be a number >= 0, got -1.0; e.g. pipe.clip_grad_norm_\(1.0\)"):
            pipe.clip_grad_norm_(-1.0)
        with pytest.raises(ValueError, match=r"norm_type must be a number > 0 or float\('inf'\), got 'two'"):
            pipe.clip_grad_norm_(1.0, "two")
        next(iter(pipe.parameters())).grad[0].fill_(float("nan"))
        before = [p.grad.clone() for p in pipe.parameters()]
        with pytest.raises(RuntimeError, match="total norm of order 2.0 of the pipeline's gradients is nan"):
            pipe.clip_grad_norm_(1.0, error_if_nonfinite=True)
        after = [p.grad for p in pipe.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before[1:], after[1:]))  # raised before scaling anything
