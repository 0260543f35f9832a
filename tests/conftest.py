"""Shared helpers: float64 reference models and gradient comparison against the un-pipelined run."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn


def mlp(layers: int = 6, width: int = 12, dropout: float = 0.0, seed: int = 0) -> nn.Sequential:
    """A float64 MLP whose layers are individually placeable (Linear/Tanh/Dropout...)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = [nn.Linear(8, width)]
    while len(mods) < layers - 1:
        mods.append(nn.Tanh() if len(mods) % 2 else nn.Linear(width, width))
        if dropout and len(mods) == 2:
            mods.append(nn.Dropout(dropout))
    mods.append(nn.Linear(width, 4))
    return nn.Sequential(*mods[:layers] if len(mods) > layers else mods).double()


def reference_grads(model: nn.Sequential, loss_fn, inputs, targets):
    """Loss and parameter gradients of the plain, un-pipelined model on the whole batch."""
    ref = copy.deepcopy(model)
    loss = loss_fn(ref(inputs), targets)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in ref.parameters()]


def assert_grads_equal(model: nn.Sequential, expected, atol: float = 1e-12) -> None:
    for index, (param, grad) in enumerate(zip(model.parameters(), expected)):
        assert param.grad is not None, f"parameter {index} got no gradient"
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=atol, msg=f"parameter {index}")


def pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pipesched-")]


@pytest.fixture
def no_thread_leak():
    """Fail the test if it leaves pipesched threads running."""
    import gc

    before = set(pipeline_threads())
    yield
    gc.collect()
    for thread in set(pipeline_threads()) - before:
        thread.join(timeout=5)
    leaked = set(pipeline_threads()) - before
    assert not leaked, f"threads left running: {sorted(t.name for t in leaked)}"


@pytest.fixture
def one_process_group():
    """A gloo group of one process, in this process (an in-memory store: no port, no child process)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow`` tests (several process launches, long matrices) run only with ``PIPESCHED_SLOW=1``:
    the README's ``pytest -q`` is CI's command and stays under ten minutes on two cores."""
    import os

    if os.environ.get("PIPESCHED_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: run with PIPESCHED_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
