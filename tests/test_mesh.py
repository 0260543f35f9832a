"""``DistributedPipeline(mesh=...)``: pp=2 x dp=2 in 4 gloo processes, FSDP2 and replicate, vs the plain model.

Schedules gpipe, 1f1b and zb-h1 under both, and two with two stages per
rank (interleaved-1f1b, zb-v).

Every case runs in one world (``tests/mesh_scenarios.py``): the replicas
count different numbers of tokens (``CrossEntropyLoss`` ignoring padded
targets) and start from different weights, and the loss, every parameter's
full gradient and the weights after two AdamW steps equal the plain model's on
the global batch in float64.
"""

from __future__ import annotations

import mesh_scenarios
import pytest
from test_distributed import run_world

TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_world(4, [], tmp_path_factory.mktemp("mesh"), entry=mesh_scenarios.entry)


@pytest.mark.parametrize("schedule,kind", mesh_scenarios.CASES, ids=[f"{s}-{k}" for s, k in mesh_scenarios.CASES])
def test_gradients_loss_and_weights_equal_the_plain_model_on_the_global_batch(results, schedule, kind):
    for rank, result in enumerate(results):
        case = result[f"{schedule}-{kind}"]
        assert case["loss"] <= TOLERANCE, (rank, case)
        assert case["grad"] <= TOLERANCE, (rank, case)
        assert case["weight"] <= TOLERANCE, (rank, case)
        assert case["input"] <= TOLERANCE, (rank, case)  # inputs that require grad, on stage 0's rank
        assert case["sharded"] == (kind == "fsdp"), (rank, case)  # fsdp holds a shard, ddp the whole stage
        assert case["resharded"], (rank, case)


@pytest.mark.parametrize("schedule,kind", mesh_scenarios.CASES, ids=[f"{s}-{k}" for s, k in mesh_scenarios.CASES])
def test_the_inputs_gradients_are_checked_on_stage_0s_rank_of_each_replica(results, schedule, kind):
    seen = [result[f"{schedule}-{kind}"]["input_seen"] for result in results]
    assert seen[0] and seen[1], seen  # pipeline rank 0 holds stage 0 under every schedule here


def test_a_summed_loss_sums_the_replicas(results):
    for rank, result in enumerate(results):
        case = result["summed"]
        assert max(case["loss"], case["grad"], case["weight"], case["input"], case["after"]) <= TOLERANCE, (rank, case)


@pytest.mark.parametrize("schedule,kind", mesh_scenarios.CASES, ids=[f"{s}-{k}" for s, k in mesh_scenarios.CASES])
def test_gradients_are_reduced_once_a_step_after_every_micro_batch(results, schedule, kind):
    """No forward, B or W task reduces: one reduction per stage, after the end-of-step exchange
    (which every rank of every replica enters only after its whole plan ran)."""
    for rank, result in enumerate(results):
        events = result[f"{schedule}-{kind}"]["reductions"]
        peer = results[rank ^ 1][f"{schedule}-{kind}"]["reductions"]  # the same stages in the other replica
        assert events[0] == "exchange" and events[1:] == ["reduce"] * len(events[1:]), (rank, events)
        assert 1 <= len(events[1:]) <= 2 and events == peer, (rank, events, peer)  # one per stage with weights


@pytest.mark.parametrize("schedule,kind", mesh_scenarios.CASES, ids=[f"{s}-{k}" for s, k in mesh_scenarios.CASES])
def test_a_step_failing_on_one_replica_fails_on_all_and_changes_nothing(results, schedule, kind):
    cases = [result[f"{schedule}-{kind}"] for result in results]
    # replica 0 (processes 0 and 2): the last stage's rank refused its targets, its other rank learns it
    assert sorted(cases[r]["raised"].split(",")[0] for r in (0, 2)) == [
        "RemoteStepError: ValueError: targets hold 2 rows but inputs hold 4; they must match row for row",
        "ValueError: targets hold 2 rows but inputs hold 4; they must match row for row"], cases
    for rank in (1, 3):  # replica 1 learns it from the mesh['dp'] exchange
        assert cases[rank]["raised"].startswith("RemoteStepError: 1 of the 2 data-parallel replicas"), cases[rank]
    for rank, case in enumerate(cases):
        assert case["unchanged"], (rank, case)
        assert case["after"] <= TOLERANCE, (rank, case)  # the next step (and a forward) is exact


def test_bad_arguments_are_refused_naming_the_argument_and_the_fix(results):
    for result in results:
        refused = result["refusals"]
        assert "mesh_dim_names=('dp',)" in refused["no_pp"] and "'pp'" in refused["no_pp"]
        assert "'zero3'" in refused["kind"] and "data_parallel must be one of" in refused["kind"]
        assert "either mesh= or group=/data_parallel_group=" in refused["both"]
        assert refused["not_mesh"].startswith("TypeError: mesh must be a torch.distributed.device_mesh.DeviceMesh")



def test_what_a_dp_mesh_does_not_support_yet_is_refused(results):
    """Clipping, a GradScaler, tied weights, buffers and a loss's parameters are supported now
    (``tests/test_mesh_features.py``); deferred batch norm is what is left."""
    for result in results:
        refused = result["refusals"]["deferred_batch_norm"]
        assert "deferred_batch_norm=True is not supported with a mesh that has a 'dp' dimension yet" in refused


def test_fsdp_param_groups_found_on_torch_2_11_states_too():
    """torch 2.11 (the GPU image) keeps one ``_fsdp_param_group``, 2.13 a list ``_fsdp_param_groups``:
    reading only the list crashed every mesh step on 2.11."""
    from types import SimpleNamespace

    from pipesched.distributed.mesh_parallel import _param_groups

    first, second = object(), object()
    assert _param_groups(SimpleNamespace(_fsdp_param_groups=[first, second])) == [first, second]
    assert _param_groups(SimpleNamespace(_fsdp_param_group=first)) == [first]
    assert _param_groups(SimpleNamespace(_fsdp_param_group=None)) == []
