"""``DistributedPipeline(mesh=...)``: pp=2 x dp=2 in 4 gloo processes, FSDP2 and replicate, vs the plain model.

Every case runs in one world (``tests/mesh_scenarios.py``): the replicas
count different numbers of tokens (``CrossEntropyLoss`` ignoring padded
targets) and start from different weights, and the loss, every parameter's
full gradient and the weights after two SGD steps equal the plain model's on
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
        assert case["sharded"] == (kind == "fsdp"), (rank, case)  # fsdp holds a shard, ddp the whole stage
        assert case["resharded"], (rank, case)


@pytest.mark.parametrize("schedule,kind", mesh_scenarios.CASES, ids=[f"{s}-{k}" for s, k in mesh_scenarios.CASES])
def test_gradients_are_reduced_once_a_step_after_every_micro_batch(results, schedule, kind):
    """No forward, B or W task reduces: one reduction per stage, after the end-of-step exchange
    (which every rank of every replica enters only after its whole plan ran)."""
    for rank, result in enumerate(results):
        assert result[f"{schedule}-{kind}"]["reductions"] == ["exchange", "reduce"], (rank, result)


@pytest.mark.parametrize("schedule,kind", mesh_scenarios.CASES, ids=[f"{s}-{k}" for s, k in mesh_scenarios.CASES])
def test_a_step_failing_on_one_replica_fails_on_all_and_changes_nothing(results, schedule, kind):
    for rank, result in enumerate(results):
        case = result[f"{schedule}-{kind}"]
        assert case["unchanged"], (rank, case)
        if rank == 0:  # replica 0's stage-1 rank (process 2) refused its targets
            assert case["raised"].startswith("RemoteStepError: ValueError: targets hold 2 rows"), case
        elif rank == 2:
            assert case["raised"].startswith("ValueError: targets hold 2 rows"), case
        else:  # replica 1 learns it from the mesh['dp'] exchange
            assert case["raised"].startswith("RemoteStepError: 1 of the 2 data-parallel replicas"), case
        assert case["after"] <= TOLERANCE, (rank, case)  # the next step (and a forward) is exact


def test_bad_arguments_are_refused_naming_the_argument_and_the_fix(results):
    for result in results:
        refused = result["refusals"]
        assert "mesh_dim_names=('dp',)" in refused["no_pp"] and "'pp'" in refused["no_pp"]
        assert "'zero3'" in refused["kind"] and "data_parallel must be one of" in refused["kind"]
        assert "either mesh= or group=/data_parallel_group=" in refused["both"]
        assert refused["not_mesh"].startswith("TypeError: mesh must be a torch.distributed.device_mesh.DeviceMesh")
        assert "buffer '1.running_mean'" in refused["buffers"]
        assert "weights tied across pipeline ranks" in refused["tied"]


@pytest.mark.parametrize("name", ["clip", "scaler"])
def test_what_a_dp_mesh_does_not_support_yet_is_refused(results, name):
    for result in results:
        for schedule, kind in mesh_scenarios.CASES:
            assert "not supported with a mesh that has a 'dp' dimension yet" in result[f"{schedule}-{kind}"][name]
