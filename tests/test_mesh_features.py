"""Under a pp=2 x dp=2 mesh (FSDP2 and replicate), what used to be refused now equals the plain model.

4 gloo processes, float64 (``tests/mesh_features.py``): ``pipe.clip_grad_norm_``
over pp x dp, a ``GradScaler`` (an inf in one replica's batch makes every
process skip), weights tied across the pipeline ranks, a loss function with a
parameter, buffers. Each replica counts a different number of tokens and starts
from its own weights.
"""

from __future__ import annotations

import mesh_features
import pytest
from test_distributed import run_world

TOLERANCE = 1e-12
KINDS = mesh_features.KINDS


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_world(4, [], tmp_path_factory.mktemp("mesh_features"), entry=mesh_features.entry)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", ["2", "inf"])
def test_clip_grad_norm_over_pp_and_dp_equals_torchs_on_the_plain_model(results, kind, norm):
    for rank, result in enumerate(results):
        case = result[f"clip-{kind}"]
        assert case[f"clipped_{norm}"], (rank, case)  # the norm exceeded max_norm: gradients were scaled
        assert case[f"norm_{norm}"] <= TOLERANCE, (rank, case)  # the total norm, over every shard and stage
        assert case[f"grad_{norm}"] <= TOLERANCE, (rank, case)  # the clipped gradients
        assert case[f"weight_{norm}"] <= TOLERANCE, (rank, case)  # an SGD step over pipe.parameters()


@pytest.mark.parametrize("kind", KINDS)
def test_grad_scaler_steps_and_skips_on_every_process_as_the_plain_models_one_scaler(results, kind):
    for rank, result in enumerate(results):
        case = result[f"scaler-{kind}"]
        assert case["grad"] <= TOLERANCE * 2**8, (rank, case)  # scaled gradients (scale 256)
        assert max(case["weight"]) <= TOLERANCE, (rank, case)  # finite, inf on replica 1 only, finite
        assert [mine for mine, _ in case["scale"]] == [ref for _, ref in case["scale"]] == [256.0, 128.0, 128.0]


@pytest.mark.parametrize("kind", KINDS)
def test_loss_fn_parameters_are_reduced_across_dp_by_token_share(results, kind):
    for rank, result in enumerate(results):
        case = result[f"loss_parameters-{kind}"]
        assert max(case["loss"], case["grad"], case["weight"]) <= TOLERANCE, (rank, case)
        if rank >= 2:  # the last stage's processes hold the loss
            assert case["loss_grad"] is not None and case["loss_grad"] <= TOLERANCE, (rank, case)
        else:
            assert case["loss_grad"] is None, (rank, case)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("schedule", mesh_features.TIED_SCHEDULES)
def test_weights_tied_across_pipeline_ranks_under_a_dp_mesh(results, kind, schedule):
    for rank, result in enumerate(results):
        case = result[f"tied-{schedule}-{kind}"]
        assert max(case["grad"], case["norm"]) <= TOLERANCE, (rank, case)
        assert max(case["loss"], case["weight"]) <= 1e-11, (rank, case)  # a log-softmax over 13 classes, two steps


@pytest.mark.parametrize("kind", KINDS)
def test_buffers_start_as_the_dp_roots_and_running_stats_are_the_first_replicas(results, kind):
    cases = [result[f"buffers-{kind}"] for result in results]
    for rank, case in enumerate(cases):
        assert max(case["loss"], case["grad"], case["shift"]) <= TOLERANCE, (rank, case)
        assert case["stats"] <= TOLERANCE and case["replicas_equal"], (rank, case)
    assert [case["stats_seen"] for case in cases] == [True, True, False, False]  # batch norm is in stage 0
