"""The split backward's start-up self-check: it passes on this torch, and it can fail, loudly and by name."""

from __future__ import annotations

import warnings

import pytest
import torch

from pipesched.runtime import autograd_internals, split_selfcheck
from pipesched.runtime.split_backward import backward_input


def test_every_relied_on_behaviour_holds_on_this_torch():
    assert split_selfcheck._check() == ([], [])


def test_a_missing_internal_is_refused_by_name_with_the_fix(monkeypatch):
    monkeypatch.setattr(split_selfcheck, "_outcome", [])
    monkeypatch.setattr(split_selfcheck, "ACCUMULATE_GRAD", autograd_internals._Missing)
    for _ in range(2):  # checked once, refused every time
        with pytest.raises(RuntimeError, match=r"AccumulateGrad.*schedule without W actions \(1f1b"):
            split_selfcheck.self_check()


def test_a_hook_order_change_is_refused(monkeypatch):
    monkeypatch.setattr(split_selfcheck, "_outcome", [])
    monkeypatch.setattr(split_selfcheck, "_hooks_order", lambda: "a node pre-hook no longer sees ...")
    with pytest.raises(RuntimeError, match="pre-hook no longer sees"):
        split_selfcheck.self_check()


def test_a_slower_but_exact_behaviour_warns_once(monkeypatch):
    monkeypatch.setattr(split_selfcheck, "_outcome", [])
    monkeypatch.setattr(split_selfcheck, "_call_inside_task", lambda *args: (torch.ones(1), None))
    with pytest.warns(UserWarning, match="still exact but slower.*repeats the input-gradient product"):
        split_selfcheck.self_check()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split_selfcheck.self_check()


def test_backward_input_runs_the_check_first(monkeypatch):
    monkeypatch.setattr(split_selfcheck, "_outcome", [(["something broke"], [])])
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="something broke"):
        backward_input([x * 2], [torch.ones(2)], [x], [])
