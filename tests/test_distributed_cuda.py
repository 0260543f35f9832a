"""Multi-process runs on a CUDA device: two gloo processes whose ranks share ``cuda:0``.

The multi-process backend stages messages (and data parallelism its
gradients) through host memory; on a GPU that means device-to-host and
host-to-device copies around every message, on the ranks' own streams.
Covered: DistributedPipeline (1F1B, ZB-V, a float16 step with a scaler per
process) and single-process Pipelines joined by ``data_parallel_group``. Skipped without a CUDA device (the scenario
itself runs on the CPU in ``tests/dist_scenarios.py`` when asked).
"""

from __future__ import annotations

import pytest
import torch
from test_distributed import run_world

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_processes_sharing_one_gpu_give_the_plain_models_gradients(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPESCHED_TEST_DEVICE", "cuda:0")
    for rank, result in enumerate(run_world(2, ["device"], tmp_path)):
        for name, verdict in result["device"].items():
            assert verdict["ok"], f"rank {rank}, {name}: {verdict}"
