"""Where messages cross (``pipesched.distributed.staging``), and that the CPU/gloo runs take NCCL's path.

The decision is one function of (backend, device); the transport then runs one
code path, every message through ``batch_isend_irecv``. A real 2-process gloo
run checks both: exact gradients, and no message sent or received outside a batch.
"""

from __future__ import annotations

import pytest
import staging_scenarios
import torch
from test_distributed import run_world

from pipesched.distributed.staging import (
    RECEIVE_AHEAD,
    backend_for,
    check_backend,
    receive_ahead,
    stages_through_host,
    wire_device,
)

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("backend,device,staged,wire", [
    ("nccl", CUDA, False, CUDA),  # NCCL carries CUDA tensors: straight from the device
    ("cpu:gloo,cuda:nccl", CUDA, False, CUDA),  # init_process_group()'s default with GPUs
    ("gloo", CUDA, True, CPU),  # gloo cannot send CUDA tensors: through host memory
    ("gloo", CPU, False, CPU),  # what every CPU test runs
    ("cpu:gloo,cuda:nccl", CPU, False, CPU),
])
def test_staging_decision_by_backend_and_device(backend, device, staged, wire):
    assert stages_through_host(backend, device) is staged
    assert wire_device(backend, device) == wire


def test_backends_are_read_per_device_type():
    assert backend_for("cpu:gloo,cuda:nccl", "cuda") == "nccl"
    assert backend_for("cpu:gloo,cuda:nccl", "cpu") == "gloo"
    assert backend_for("nccl", "cpu") is None


def test_nccl_matches_by_order_so_one_message_per_peer_is_posted_ahead():
    assert receive_ahead("gloo", CPU) == receive_ahead("gloo", CUDA) == RECEIVE_AHEAD
    assert receive_ahead("cpu:gloo,cuda:nccl", CUDA) == 1


def test_nccl_is_accepted_where_the_group_carries_cpu_tensors_too():
    check_backend("gloo", CPU)
    check_backend("cpu:gloo,cuda:nccl", CPU)
    with pytest.raises(NotImplementedError, match=r"init_process_group\('cpu:gloo,cuda:nccl'\)"):
        check_backend("nccl", CPU)  # the per-step framing uses CPU tensors


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_nccl_without_a_gpu_fails_with_a_clear_message():
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        check_backend("cpu:gloo,cuda:nccl", CUDA)


def test_every_message_of_a_gloo_step_crosses_through_batch_isend_irecv(tmp_path):
    for rank, result in enumerate(run_world(2, [], tmp_path, entry=staging_scenarios.entry)):
        assert result["loss"] <= 1e-12 and result["grad"] <= 1e-12, (rank, result)
        assert result["wire"] == "cpu" and result["messages"] > 0, (rank, result)
        assert result["batched"] > 0 and result["outside"] == 0, (rank, result)
