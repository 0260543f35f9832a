"""CPU ranks and intra-op threads: the once-per-process warning when ranks want more threads than cores."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pipesched import Pipeline
from pipesched.runtime import cpu_threads
from pipesched.runtime.cpu_threads import available_cores, cores_per_rank, warn_if_oversubscribed


@pytest.fixture
def threads(monkeypatch):
    """Set torch's intra-op thread count for one test; the warning may fire again; all restored after."""
    previous = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_warned", False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def two_rank_pipeline() -> Pipeline:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    return Pipeline(model, schedule="1f1b", devices=["cpu", "cpu"], chunks=2, loss_fn=nn.MSELoss())


def test_cpu_pipeline_with_more_threads_than_cores_per_rank_warns_once_and_names_the_fix(threads):
    share = cores_per_rank(2)
    threads(share + 1)
    with pytest.warns(UserWarning) as caught:
        for _ in range(3):  # three pipelines, one warning: a training script is told once
            with two_rank_pipeline() as pipe:
                pipe.step(torch.randn(4, 4), torch.randn(4, 2))
    messages = [str(w.message) for w in caught if "intra-op threads" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"torch.set_num_threads({share})" in messages[0]
    assert f"2 ranks on {available_cores()} cores with {share + 1} intra-op threads" in messages[0]
    assert caught[0].filename == __file__  # it points at the line that built the pipeline


def test_no_warning_when_threads_fit_the_cores_per_rank(threads):
    threads(cores_per_rank(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two_rank_pipeline().close()
        threads(available_cores())  # one CPU rank may use every core
        Pipeline(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), devices=["cpu"], chunks=2).close()
        warn_if_oversubscribed([torch.device("cuda", 0), torch.device("cuda", 1)])  # no CPU rank, no warning


def test_other_processes_of_a_torchrun_job_on_this_machine_count(threads, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one rank here, one in the other local process
    threads(cores_per_rank(2) + 1)
    with pytest.warns(UserWarning, match=r"runs 2 ranks on"):
        warn_if_oversubscribed([torch.device("cpu")])
