"""Distributed checkpoints saved at pp=2 x dp=2 (FSDP2) reload into pp=4, pp=2 x dp=1 and the plain model.

``torch.distributed.checkpoint.save({"model": pipe.state_dict(), "optim":
optimizer_state_dict(pipe, opt)})`` on every process; each other layout
starts from other weights and a fresh AdamW, loads, and trains on: its
losses, gradients and weights after every step equal those of the plain
model that never stopped (float64), as do those of the saving run itself.
Scenarios: ``tests/dcp_scenarios.py``.
"""

from __future__ import annotations

import dcp_scenarios
import pytest
import torch
from test_distributed import run_world
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from pipesched.distributed import load_optimizer_state_dict, optimizer_state_dict

TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    checkpoint = root / "checkpoint"
    results = run_world(4, [str(checkpoint)], root, entry=dcp_scenarios.entry_save)
    return checkpoint, results


def test_the_saving_run_is_exact_before_and_after_saving(saved):
    _, results = saved
    for rank, result in enumerate(results):
        assert max(result["before"] + result["after"]) <= TOLERANCE, (rank, result)


def test_checkpoint_keys_are_the_models_own_names(saved):
    """Model keys as in ``model.state_dict()``; optimizer keys flat, one per parameter and entry."""
    _, results = saved
    model = dcp_scenarios.mlp()
    names = set(model.state_dict())
    for rank, result in enumerate(results):
        model_keys = [k for k in result["keys"] if not k.startswith(("state.", "param_groups."))]
        assert model_keys and set(model_keys) <= names, (rank, result["keys"])
        for key in result["keys"]:
            if key.startswith("state."):
                assert key.rsplit(".", 1)[0][len("state."):] in names, key
    together = {k for r in results for k in r["keys"] if k in names}
    assert together == names  # pp ranks together hold the whole model


@pytest.mark.slow  # two more worlds of processes
@pytest.mark.parametrize("layout,world", [("pp4", 4), ("pp2xdp1", 2)])
def test_a_checkpoint_of_pp2_x_dp2_reloads_into_another_layout_and_training_continues_exactly(
        saved, tmp_path, layout, world):
    checkpoint, _ = saved
    results = run_world(world, [str(checkpoint), layout], tmp_path, entry=dcp_scenarios.entry_load)
    for rank, result in enumerate(results):
        assert len(result["after"]) == dcp_scenarios.STEPS_AFTER
        assert max(result["after"]) <= TOLERANCE, (layout, rank, result)


def test_a_checkpoint_of_pp2_x_dp2_reloads_into_the_plain_model(saved, tmp_path):
    """``dcp_to_torch_save``: one file, loaded by the un-pipelined model and its optimizer, no process group."""
    checkpoint, _ = saved
    dcp_to_torch_save(checkpoint, tmp_path / "plain.pt")
    state = torch.load(tmp_path / "plain.pt", weights_only=False)
    reference = dcp_scenarios.Reference()
    dcp_scenarios.train_reference(reference, 1)
    model = dcp_scenarios.mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt = dcp_scenarios.optimizer(model.parameters())
    model.load_state_dict(state["model"])
    template = optimizer_state_dict(model, opt)
    assert set(template) == set(state["optim"])  # the plain model's flat keys are the pipeline's
    load_optimizer_state_dict(model, opt, state["optim"])
    for _ in range(dcp_scenarios.STEPS_AFTER):
        expected = reference.step()
        opt.zero_grad()
        loss = dcp_scenarios.loss_fn()(model(reference.x), reference.y)
        loss.backward()
        assert abs(loss.item() - expected) <= TOLERANCE
        for p, q in zip(model.parameters(), reference.model.parameters()):
            assert (p.grad - q.grad).abs().max().item() <= TOLERANCE
        opt.step()
        reference.optimizer.step()
        for p, q in zip(model.parameters(), reference.model.parameters()):
            assert (p - q).abs().max().item() <= TOLERANCE


def test_an_optimizer_over_other_parameters_is_refused_naming_the_fix():
    model, other = dcp_scenarios.mlp(), dcp_scenarios.mlp()
    with pytest.raises(ValueError, match=r"build it over pipe.parameters\(\)"):
        optimizer_state_dict(model, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got dict"):
        optimizer_state_dict(model, {})
