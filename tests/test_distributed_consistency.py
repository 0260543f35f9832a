"""What the multi-process pipeline must share with the single-process one, and what its ranks must
agree on: 2 real gloo processes (scenarios in dist_consistency.py), float64 references.
"""

from __future__ import annotations

import dist_consistency
import pytest
from test_distributed import run_world

NAMES = ["input_grads", "input_grads_dp", "backward_half_dp", "sparse"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_world(2, NAMES, tmp_path_factory.mktemp("consistency"), dist_consistency.entry)


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """Its own processes: without the agreement, ranks built differently hang in their collectives."""
    return run_world(2, ["mismatched_options"], tmp_path_factory.mktemp("mismatched"), dist_consistency.entry)


def verdicts(results, prefix: str) -> list[tuple[int, str, object]]:
    found = [(rank, key, value) for rank, result in enumerate(results) for key, value in result.items()
             if key.startswith(prefix)]
    crashes = [f"rank {rank}: {value}" for rank, key, value in found if key.endswith(":crash")]
    assert not crashes, "\n".join(crashes)
    assert found, f"no verdict for {prefix!r}"
    return found


def test_distributed_step_writes_input_gradients(results):
    """Review 1.4: x.grad stayed None on stage 0's rank; Pipeline.step writes it exactly."""
    for rank, key, verdict in verdicts(results, "input_grads:"):
        assert verdict["ok"], f"rank {rank}, {key}: {verdict}"


def test_distributed_step_input_gradients_with_data_parallel(results):
    """Each replica's inputs get its share (by tokens) of the global batch's input gradient."""
    for rank, key, verdict in verdicts(results, "input_grads_dp"):
        assert verdict["ok"], f"rank {rank}, {key}: {verdict}"


def test_forward_backward_half_with_data_parallel_group_keeps_replicas_equal(results):
    """Review 1.5: the backward half of pipe(x) left each replica its own gradients (1.04 apart)."""
    for rank, key, verdict in verdicts(results, "backward_half_dp"):
        assert verdict["ok"], f"rank {rank}, {key}: {verdict}"
        assert "does not require grad" in verdict["distributed_raised"]
        # replica 1's forward failed: its own error there, RemoteStepError on replica 0; no wait
        assert verdict["failed"].startswith("RemoteStepError" if rank == 0 else "RuntimeError"), verdict["failed"]
        assert verdict["unchanged"] and verdict["next_grad_error"] < 1e-12, verdict


def test_ranks_with_different_options_fail_at_construction(mismatched):
    """Review 1.11: the step failed after stall_timeout with misleading errors. Now the constructor
    raises on every rank (no step runs, so no stall can be waited for), naming option and values."""
    expected = {"chunks": "rank 0: 2, rank 1: 4", "schedule": "rank 0: 'gpipe', rank 1: '1f1b'",
                "balance": "rank 0: (3, 2), rank 1: (2, 3)", "checkpoint": "rank 0: 'never', rank 1: 'always'"}
    for rank, result in enumerate(mismatched):
        crash = result.get("mismatched_options:crash")
        assert crash is None, f"rank {rank}: {crash}"
        for option, values in expected.items():
            message = result[f"mismatch:{option}"]
            assert message is not None, f"rank {rank}: different {option} were not refused at construction"
            assert f"ranks were built with different {option}" in message and values in message, message
        refused = result["mismatch:refused"]  # rank 1's own chunks=0: its error there, named elsewhere
        assert refused is not None and "chunks" in refused, refused
        assert refused.startswith("ValueError" if rank == 1 else "RemoteStepError: rank 1 could not build"), refused
        assert result["mismatch:after"] == mismatched[0]["mismatch:after"]  # the group is still usable


def test_data_parallel_and_tied_weights_across_processes_refuse_sparse_gradients(results):
    """Review 1.12: a raw 'reshape is not implemented for sparse tensors' at the first step."""
    for rank, result in enumerate(results):
        for case in ("data_parallel", "tied"):
            message = result[f"sparse:{case}"]
            assert message is not None, f"rank {rank}: sparse gradients ({case}) were not refused"
            assert "'0.weight'" in message and "sparse=False" in message, message
