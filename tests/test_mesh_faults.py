"""A process of a pp=2 x dp=2 mesh dies mid-step: every other process raises ``PeerLost`` within ``stall_timeout``.

Process 2 (pipeline rank 1 of replica 0) exits abruptly inside its stage's
forward. Process 0, its pipeline peer, loses the connection and raises at
once; it then stays alive without joining the end-of-step exchange over
``mesh["dp"]`` (as a process whose pipeline is unusable does), so process 1,
its data-parallel partner, can only learn it from that collective's deadline:
before ``pipesched.distributed.dp_deadline`` it waited for gloo's 30-minute
default. Process 3 meets the dead process in the same exchange and raises at
once. The test's deadline (150 s) is the hang detector; no timing is asserted.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch.distributed as dist
from dist_scenarios import ExitProcess, run_scenarios
from mesh_scenarios import ROWS, data, mlp
from test_distributed import DEADLINE, free_port
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

STALL = 5.0


def write(directory: str, rank: int, out: dict) -> None:
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as file:
        json.dump(out, file)


def scenario(rank: int, directory: str, out: dict) -> None:
    from pipesched.distributed import DistributedPipeline, PeerLost

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    exiting = ExitProcess()
    layers = list(mlp())
    layers.insert(3, exiting)  # inside stage 1 (pipeline rank 1)
    x, y = data()
    mine = slice(ROWS * (rank % 2), ROWS * (rank % 2) + ROWS)
    pipe = DistributedPipeline(nn.Sequential(*layers), schedule="1f1b", chunks=2, loss_fn=nn.CrossEntropyLoss(),
                               mesh=mesh, stall_timeout=STALL, log_tasks=False)
    # replicas must enter a step within STALL of each other: line them up (this machine may be loaded)
    dist.barrier()
    pipe.step(x[mine], y[mine])  # a healthy step first
    dist.barrier()
    if rank == 2:
        write(directory, rank, {"exits": True})
        exiting.armed = True
    try:
        pipe.step(x[mine], y[mine])
        out["raised"] = None
    except PeerLost as error:
        out.update(raised="PeerLost", message=str(error))
    except BaseException as error:  # noqa: BLE001 - the test reads what it was
        out.update(raised=type(error).__name__, message=str(error))
    try:
        pipe.step(x[mine], y[mine])
        out["next"] = None
    except RuntimeError as error:
        out["next"] = str(error)
    if rank == 0:  # alive and silent, as a process whose pipeline broke: process 1 must not wait for it
        write(directory, rank, out)
        multiprocessing.Event().wait()


def entry(rank: int, world: int, port: int, directory: str) -> None:
    """One process; leaves abruptly (os._exit) after its verdicts: the group has a dead member."""
    run_scenarios(rank, world, port, ["faults"], directory, lambda _, out: scenario(rank, directory, out),
                  leave_abruptly=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mesh_faults")
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=entry, args=(rank, 4, port, str(directory))) for rank in range(4)]
    for process in processes:
        process.start()
    try:
        for rank in (1, 3):
            processes[rank].join(DEADLINE)
            assert not processes[rank].is_alive(), f"process {rank} did not finish within {DEADLINE:.0f}s (hang)"
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)
    return {rank: json.loads((directory / f"rank{rank}.json").read_text()) for rank in (0, 1, 3)}


def test_a_process_dying_mid_step_surfaces_as_peer_lost_on_every_other_process(results):
    for rank, result in results.items():
        assert "crash" not in result, f"process {rank} crashed:\n{result.get('crash')}"
        assert result["raised"] == "PeerLost", (rank, result)
        assert result["next"].startswith("this pipeline is unusable after losing"), (rank, result)
    assert results[0]["message"].startswith("lost rank 1"), results[0]  # its pipeline peer, directly


def test_a_replica_waiting_in_the_dp_exchange_gives_up_at_stall_timeout_not_the_groups_timeout(results):
    """Process 1's partner (process 0) is alive but never joins: only the deadline can end the wait."""
    assert "data-parallel replica (mesh['dp']) is gone" in results[1]["message"], results[1]
    assert "timed out" in results[1]["message"].lower(), results[1]  # the deadline, not a broken connection
    assert "data-parallel replica (mesh['dp']) is gone" in results[3]["message"], results[3]
