"""Loss parameters across processes: a multi-process pipeline, and pipelines joined by data parallelism.

Two gloo processes on 127.0.0.1 under a deadline (a hang fails the test); the
scenarios live in loss_leaf_scenarios.py and compare against their own
un-pipelined float64 references.
"""

from __future__ import annotations

import loss_leaf_scenarios
import pytest
from test_distributed import run_world


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> list[dict]:
    names = ["split", "foreign", "replicas", "dp_distributed"]
    return run_world(2, names, tmp_path_factory.mktemp("loss-leaves"), loss_leaf_scenarios.entry)


def test_loss_fn_parameter_in_distributed_pipeline(verdicts):
    """Regression: under a split schedule the last rank's W was given its stages' parameters only, so
    the loss's temperature got ``.grad = None`` in a DistributedPipeline too."""
    for schedule in ("zb-h1", "zb-v"):
        for rank, result in enumerate(verdicts):
            verdict = result[schedule]
            assert max(verdict["loss"], verdict["weights"], verdict["log_t"]) < 1e-12, (rank, schedule, verdict)
        assert [r[schedule]["last"] for r in verdicts].count(True) == 1, schedule


def test_loss_term_reading_another_ranks_parameter_is_refused(verdicts):
    """A regulariser on stage 0's weight computed by the last rank would land in that rank's unused
    copy of the weight (silently lost): refused, on every rank, with no gradient changed."""
    last, first = verdicts[1], verdicts[0]
    assert last["foreign"].startswith("ValueError: loss_fn reaches a tensor that requires grad but is not one of "
                                      "this pipeline's parameters (shape (12, 8), torch.float64)"), last["foreign"]
    assert "a parameter of a stage on another rank" in last["foreign"], last["foreign"]
    assert first["foreign"].startswith("RemoteStepError"), first["foreign"]
    assert last["foreign_grads_untouched"] and first["foreign_grads_untouched"]


def test_loss_fn_parameters_reduced_across_data_parallel_replicas(verdicts):
    """Regression: only the model's parameters were broadcast at start and summed after each step, so
    a loss's temperature kept each replica's own value and gradient and the replicas drifted apart.
    A tensor the loss closes over (outside ``pipe.parameters()``) is refused, naming why."""
    for rank, result in enumerate(verdicts):
        assert result["replica_log_t_grad"] < 1e-12 and result["replica_log_t"] < 1e-12, (rank, result)
        assert result["replica_stray"].startswith("ValueError: loss_fn reaches a tensor") or \
            result["replica_stray"].startswith("RemoteStepError"), (rank, result["replica_stray"])
        assert result["replica_stray_grad"], rank
    assert any("replicas would drift apart" in r["replica_stray"] for r in verdicts), verdicts


def test_loss_fn_parameters_of_distributed_pipelines_start_equal_and_are_reduced(verdicts):
    """Regression: a DistributedPipeline's replicas broadcast only their stages at construction, so
    the loss's temperature kept each process's own starting value."""
    for rank, result in enumerate(verdicts):
        verdict = result["dp_distributed"]
        assert verdict["start"] < 1e-15 and verdict["log_t_grad"] < 1e-12, (rank, verdict)
