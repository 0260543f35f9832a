"""activation_meter: "once" measures each forward signature once and reuses it; "every" measures each forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Pipeline


class SavesOnlyWhenPositive(nn.Module):
    """Saves its input for backward (``x * x``) when the batch's mean is positive, else nothing (``x + 1``).

    Same shapes, different saved bytes: only a meter that measures again sees the difference.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x if float(x.detach().mean()) > 0 else x + 1


def _identity_linear() -> nn.Linear:
    linear = nn.Linear(8, 8).double()
    with torch.no_grad():
        linear.weight.copy_(torch.eye(8, dtype=torch.float64))
        linear.bias.zero_()
    return linear


def test_once_reuses_the_first_measurement_of_a_signature_and_every_measures_each_forward():
    """Step 1 saves the Linear's output (positive batch), step 2 does not (negative batch), same shapes."""
    high, low = torch.full((4, 8), 1.0, dtype=torch.float64), torch.full((4, 8), -1.0, dtype=torch.float64)
    target = torch.zeros(4, 4, dtype=torch.float64)
    results = {}
    for meter in ("once", "every"):
        model = nn.Sequential(_identity_linear(), SavesOnlyWhenPositive(), nn.Linear(8, 4).double())
        with Pipeline(model, schedule="gpipe", balance=[2, 1], devices=["cpu", "cpu"], chunks=2,
                      checkpoint="never", loss_fn=nn.MSELoss(), activation_meter=meter) as pipe:
            pipe.step(high, target)
            first = pipe.last_report.peak_activation_bytes[0]
            pipe.step(low, target)
            results[meter] = (first, pipe.last_report.peak_activation_bytes[0])
    boundary = 2 * 8 * 8  # one micro-batch: 2 rows of 8 float64
    # every: step 1 holds input + Linear output per micro-batch (2 of them), step 2 only the inputs
    assert results["every"] == (2 * 2 * boundary, 2 * boundary)
    # once: step 2 has the same signature as step 1, so it reports step 1's measurement
    assert results["once"] == (2 * 2 * boundary, 2 * 2 * boundary)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b"])
@pytest.mark.parametrize("checkpoint", ["never", "except_last", "always"])
def test_once_reports_what_every_reports_over_steps_and_uneven_splits(schedule, checkpoint):
    """Uneven micro-batches (11 rows in 4) have two shapes, so two signatures per stage and policy."""
    reports = {}
    for meter in ("once", "every"):
        model = mlp(layers=8, width=12)
        stages = 4 if schedule == "interleaved-1f1b" else 2
        with Pipeline(model, schedule=schedule, balance=[8 // stages] * stages, devices=["cpu", "cpu"], chunks=4,
                      checkpoint=checkpoint, loss_fn=nn.MSELoss(), activation_meter=meter) as pipe:
            x = torch.randn(11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            y = torch.zeros(11, 4, dtype=torch.float64)
            got = []
            for _ in range(3):
                pipe.step(x, y)
                report = pipe.last_report
                got.append((report.peak_activation_bytes, report.held_activation_bytes, report.peak_inflight))
            reports[meter] = got
    assert reports["once"] == reports["every"]
    assert all(b > 0 for b in reports["once"][0][0])


class TanhOut(nn.Module):
    """Ends a stage with tanh, whose backward reads its output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


@pytest.mark.parametrize("meter", ["once", "every"])
def test_steps_that_reuse_measurements_give_exact_gradients(meter):
    """Forwards that run without the meter (steps 2 and 3 under "once") still give the un-pipelined gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(TanhOut(), TanhOut(), nn.Linear(8, 4)).double()
    x = torch.randn(8, 8, dtype=torch.float64)
    y = torch.randn(8, 4, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    _, expected = reference_grads(model, loss_fn, x, y)
    with Pipeline(model, schedule="1f1b", balance=[1, 1, 1], devices=["cpu"] * 3, chunks=4,
                  checkpoint="never", loss_fn=loss_fn, activation_meter=meter) as pipe:
        for _ in range(3):  # the second and third steps reuse the first step's measurements under "once"
            model.zero_grad(set_to_none=True)
            pipe.step(x, y)
            assert_grads_equal(model, expected)


def test_unknown_activation_meter_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="activation_meter must be one of 'once', 'every', got 'sometimes'"):
        Pipeline(mlp(), devices=["cpu", "cpu"], activation_meter="sometimes")


def test_distributed_pipeline_takes_activation_meter_like_pipeline(one_process_group):
    """DistributedPipeline had no activation_meter: it always reused the first measurement ("once")."""
    from pipesched.distributed import DistributedPipeline

    high, low = torch.full((4, 8), 1.0, dtype=torch.float64), torch.full((4, 8), -1.0, dtype=torch.float64)
    target = torch.zeros(4, 4, dtype=torch.float64)
    seen = {}
    for meter in ("once", "every"):
        model = nn.Sequential(_identity_linear(), SavesOnlyWhenPositive(), nn.Linear(8, 4).double())
        pipe = DistributedPipeline(model, schedule="gpipe", chunks=2, checkpoint="never", loss_fn=nn.MSELoss(),
                                   activation_meter=meter)
        try:
            pipe.step(high, target)
            first = pipe.last_report.peak_activation_bytes[0]
            pipe.step(low, target)
            seen[meter] = (first, pipe.last_report.peak_activation_bytes[0])
        finally:
            pipe.close()
    assert seen["once"][0] == seen["every"][0] > 0
    assert seen["once"][1] == seen["once"][0]  # same signature: the first step's bytes again
    boundary = 2 * 8 * 8  # one micro-batch: 2 rows of 8 float64; step 2 saves no x * x input per micro-batch
    assert seen["every"][0] - seen["every"][1] == 2 * boundary
    with pytest.raises(ValueError, match="activation_meter must be one of 'once', 'every', got 'sometimes'"):
        DistributedPipeline(nn.Sequential(nn.Linear(2, 2)), activation_meter="sometimes")
