"""Shared helpers: float64 reference models and gradient comparison against the un-pipelined run."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import threading
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from torch import nn

import pipesched
from pipesched.plan.registry import ENTRY_POINT_GROUP, register_schedule

ROOT = Path(__file__).resolve().parents[1]


def _test_this_checkout() -> None:
    """Make the schedule plug-ins the ones of this checkout, as its ``pipesched`` is.

    With ``PYTHONPATH=$PWD`` in a second worktree, ``pipesched`` comes from the
    worktree but an editable install still maps ``pipesched.schedules`` to its
    own checkout, and its entry-point metadata lists the schedules declared when
    it was installed. So: take ``pipesched.schedules`` from this checkout's
    ``schedules/``, and register the entry points this checkout's pyproject.toml
    declares that the installed metadata lacks (re-running ``pip install -e .``
    lists them for real).
    """
    if Path(pipesched.__file__).resolve().parent != ROOT / "pipesched":
        return  # testing an installed pipesched, plug-ins and all
    if "pipesched.schedules" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "pipesched.schedules", ROOT / "schedules" / "__init__.py",
            submodule_search_locations=[str(ROOT / "schedules")],
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["pipesched.schedules"] = module
        spec.loader.exec_module(module)
        pipesched.schedules = module  # type: ignore[attr-defined]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    installed = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name, target in declared.items():
        if name not in installed:
            module_name, _, attribute = target.partition(":")
            register_schedule(name, getattr(importlib.import_module(module_name), attribute), replace=True)


_test_this_checkout()


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
