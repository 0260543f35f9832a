"""Every bad argument gets an error naming the argument, the value and the fix; nothing runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import mlp
from pipesched import Pipeline


def build(**kwargs):
    kwargs.setdefault("balance", [3, 3])
    return Pipeline(kwargs.pop("module", mlp(layers=6)), **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"module": nn.Linear(2, 2)}, ValueError, "no block list .* or an nn.Sequential of its layers"),
        ({"module": nn.Sequential(), "balance": None}, ValueError, "empty nn.Sequential"),
        ({"balance": [3, 2]}, ValueError, "sums to 5"),
        ({"balance": [6, 0]}, ValueError, r"balance\[1\] = 0"),
        ({"balance": [3.0, 3]}, ValueError, r"balance\[0\] = 3.0"),
        ({"balance": []}, ValueError, "non-empty list"),
        ({"balance": "33"}, ValueError, "non-empty list"),
        ({"devices": []}, ValueError, "non-empty list"),
        ({"devices": "cpu"}, ValueError, "non-empty list"),
        ({"devices": ["cpu", "tpu:9"]}, ValueError, r"devices\[1\]"),
        ({"schedule": "zigzag"}, ValueError, "available: .*1f1b.*gpipe.*interleaved"),
        ({"schedule": 3}, TypeError, "registered name or a pipesched.Schedule"),
        ({"schedule": "gpipe", "devices": ["cpu"]}, ValueError, "exactly one stage per rank"),
        ({"schedule": "1f1b", "balance": [2, 2, 2], "devices": ["cpu"] * 2}, ValueError,
         "exactly one stage per rank"),
        ({"schedule": "interleaved", "balance": [2, 2, 2], "devices": ["cpu"] * 2}, ValueError,
         "multiple >= 2"),
        ({"chunks": 0}, ValueError, "chunks must be an int >= 1, got 0"),
        ({"chunks": -2}, ValueError, "chunks"),
        ({"chunks": 2.5}, ValueError, "chunks"),
        ({"chunks": True}, ValueError, "chunks"),
        ({"checkpoint": "sometimes"}, ValueError, "'always', 'except_last', 'never'"),
        ({"checkpoint": 3}, ValueError, "checkpoint must be"),
        ({"loss_fn": "mse"}, TypeError, "loss_fn must be callable"),
        ({"loss_fn": nn.CrossEntropyLoss(reduction="none")}, ValueError,
         "reduction='none'.*use reduction='mean' \\(the default\\) or reduction='sum'"),
        ({"loss_normalizer": 3}, TypeError, r"loss_normalizer must be a callable .*\(y != -100\).sum\(\)"),
        ({"log_tasks": "no"}, TypeError, "log_tasks must be True or False, got 'no'"),
        ({"stall_timeout": 0}, ValueError, "stall_timeout must be a number of seconds > 0 or None"),
        ({"stall_timeout": "10"}, ValueError, "stall_timeout"),
        ({"deferred_batch_norm": 1}, TypeError, "deferred_batch_norm must be True or False"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, pattern, no_thread_leak):
    with pytest.raises(error, match=pattern):
        build(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize("devices", [["cpu", "cuda:0"], ["cpu", "cuda"], [0, 1], ["cpu", torch.device("cuda", 1)]])
def test_cuda_device_without_cuda(devices):
    with pytest.raises(ValueError, match=r"devices\[\d\] = .*, but CUDA is not available here; use 'cpu'"):
        build(devices=devices)


def test_integer_device_without_cuda_names_the_fix():
    """The bug: devices=[0, 1] on a machine without CUDA said torch's words and no fix."""
    if torch.cuda.is_available():
        pytest.skip("checks the message on machines without CUDA")
    with pytest.raises(ValueError, match=r"devices\[0\] = 0, but CUDA is not available here; use 'cpu'"):
        build(devices=[0, 1])


@pytest.mark.parametrize(
    "device, pattern",
    [(-1, r"index must be >= 0; use 'cpu'"), (1.5, r"not a torch device \(a float\); use 'cpu'"),
     ("gpu:0", r"not a torch device .*; use 'cpu' or 'cuda:<index>'"),
     ("meta", r"runs on 'cpu' and 'cuda' devices; use 'cpu'")],
)
def test_every_bad_device_names_the_fix(device, pattern):
    with pytest.raises(ValueError, match=pattern):
        build(devices=["cpu", device])


def test_loss_class_instead_of_instance_names_the_fix(no_thread_leak):
    """The bug: loss_fn=nn.CrossEntropyLoss (the class) failed later inside a task."""
    with pytest.raises(TypeError, match=r"loss_fn is the class nn.CrossEntropyLoss, not a loss; "
                                        r"pass an instance: loss_fn=nn.CrossEntropyLoss\(\)"):
        build(loss_fn=nn.CrossEntropyLoss)


def test_step_without_loss_fn_names_it():
    with build() as pipe, pytest.raises(ValueError, match="loss_fn"):
        pipe.step(torch.randn(2, 8, dtype=torch.float64), torch.zeros(2))


X = torch.randn(6, 8, dtype=torch.float64)
Y = torch.zeros(6, dtype=torch.long)


@pytest.mark.parametrize(
    "inputs, targets, error, pattern",
    [
        ([1, 2], Y, TypeError, r"inputs\[0\] must be a torch.Tensor"),
        ("x", Y, TypeError, "inputs must be a Tensor"),
        ((), Y, TypeError, "non-empty tuple"),
        (torch.tensor(1.0), Y, ValueError, "0-dim"),
        ((X, X[:5]), Y, ValueError, r"disagree on batch size .*\[6, 5\]"),
        (X[:0], Y[:0], ValueError, "empty batch"),
        (X, Y[:5], ValueError, "targets hold 5 rows but inputs hold 6"),
        (X, None, TypeError, "targets must be a Tensor"),
    ],
)
def test_bad_step_inputs_are_refused_before_anything_runs(inputs, targets, error, pattern):
    ran = []

    class Spy(nn.Module):
        def forward(self, x):
            ran.append(1)
            return x

    model = nn.Sequential(Spy(), *mlp(layers=6))
    with Pipeline(model, balance=[4, 3], chunks=3, loss_fn=nn.CrossEntropyLoss()) as pipe:
        with pytest.raises(error, match=pattern):
            pipe.step(inputs, targets)
    assert ran == []


def test_non_scalar_loss_is_refused():
    with build(loss_fn=lambda output, target: (output - 1).sum(1)) as pipe:
        with pytest.raises(ValueError, match="loss_fn must return a scalar tensor, got \\(6,\\)"):
            pipe.step(X, Y)


def test_moving_a_pipeline_is_refused_but_dtype_casts_work():
    with build() as pipe:
        for move in (lambda: pipe.to("cpu"), lambda: pipe.cuda(), lambda: pipe.cpu()):
            with pytest.raises(TypeError, match="devices="):
                move()
        pipe.to(torch.float32)
        assert next(pipe.parameters()).dtype == torch.float32


@pytest.mark.parametrize("move", [
    lambda pipe: pipe.to(0),
    lambda pipe: pipe.to(device=0),
    lambda pipe: pipe.to("cuda"),
    lambda pipe: pipe.to("cuda:0", torch.float64),
    lambda pipe: pipe.to(torch.device("cuda", 0)),
    lambda pipe: pipe.to(torch.zeros(1, dtype=torch.float64)),
], ids=["index", "device-index", "cuda", "cuda-and-dtype", "torch.device", "like-tensor"])
def test_to_a_cuda_device_raises_the_documented_error_with_or_without_cuda(move):
    """Without CUDA, torch's own argument parsing failed first with an unrelated RuntimeError."""
    with build() as pipe:
        with pytest.raises(TypeError, match="places its stages on its devices itself"):
            move(pipe)
        assert next(pipe.parameters()).dtype == torch.float64  # nothing was cast either


def test_to_a_dtype_alone_casts_the_parameters():
    with build() as pipe:
        for cast in (lambda: pipe.to(torch.float32), lambda: pipe.to(dtype=torch.float64),
                     lambda: pipe.to(None, torch.float32)):
            assert cast() is pipe
        assert next(pipe.parameters()).dtype == torch.float32


def test_default_shape_is_documented_behaviour():
    """No balance, no devices: two CPU ranks (without CUDA), layers split evenly."""
    if torch.cuda.is_available():
        pytest.skip("defaults differ on CUDA machines")
    with Pipeline(mlp(layers=5)) as pipe:
        assert pipe.devices == [torch.device("cpu")] * 2 and pipe.balance == [3, 2]
    with Pipeline(mlp(layers=5), schedule="interleaved") as pipe:
        assert pipe.num_ranks == 2 and pipe.balance == [2, 1, 1, 1]
    with Pipeline(nn.Sequential(nn.Linear(2, 2))) as pipe:
        assert pipe.num_ranks == 1 and pipe.balance == [1]
    with Pipeline(mlp(layers=6), balance=[1, 1, 1, 1, 2]) as pipe:
        assert pipe.num_ranks == 5
    with Pipeline(mlp(layers=6), schedule="interleaved", balance=[1, 1, 1, 1, 1, 1]) as pipe:
        assert pipe.num_ranks == 3 and pipe.placement == [0, 1, 2, 0, 1, 2]
