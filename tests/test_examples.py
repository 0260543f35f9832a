"""The examples/ scripts run as documented (tiny random models, no downloads)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_hf_learns_its_batch(capsys):
    pytest.importorskip("transformers")
    losses = load("finetune_hf").main(["--arch", "gpt2", "--steps", "3", "--batch", "4", "16", "--chunks", "2"])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] > losses[1] > losses[2]  # AdamW memorises the repeated batch
    assert "step 2: loss" in capsys.readouterr().out
