"""Real bytes, read from the C heap (glibc ``mallinfo2``), not from pipesched's own meter.

Four ranks, 256 KiB boundary tensors (64 rows × 512 float64), stages that
each keep one boundary per micro-batch for their backward, so boundaries
dominate everything else a step allocates.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.heap import HeapPeak, available, probe  # noqa: E402
from pipesched import Pipeline  # noqa: E402

pytestmark = pytest.mark.skipif(not available(), reason="needs glibc's mallinfo2 to read the heap")

WIDTH, ROWS, RANKS = 512, 64, 4
BOUNDARY = WIDTH * ROWS * 8  # bytes of one micro-batch's activation between two stages


class Scale(nn.Module):
    """``x * w``: saves its input (one boundary) and a parameter of WIDTH values."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(WIDTH, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def measure(schedule: str, chunks: int) -> tuple[int, list[int]]:
    """(real heap peak above the pre-step level, meter's per-rank peak) of the second step."""
    meter = HeapPeak()
    model = nn.Sequential(*probe([Scale() for _ in range(RANKS)], meter))
    x = torch.randn(ROWS * chunks, WIDTH, dtype=torch.float64)
    y = torch.zeros_like(x)
    with Pipeline(model, schedule=schedule, balance=[2] * RANKS, devices=["cpu"] * RANKS, chunks=chunks,
                  checkpoint="never", loss_fn=nn.MSELoss()) as pipe:
        pipe.step(x, y)  # warm-up: gradients, worker arenas, first-call allocations
        gc.collect()
        with meter:
            pipe.step(x, y)
        return meter.above_base, list(pipe.last_report.peak_activation_bytes)


def test_one_f_one_b_real_heap_stays_bounded_while_gpipe_grows():
    """Regression: mailbox slots kept every transferred tensor until step() returned.

    The meter said 1F1B holds p - rank micro-batches, while the process really
    held all m, as much as GPipe.
    """
    gpipe, _ = measure("gpipe", 16)
    one_f_one_b, _ = measure("1f1b", 16)
    one_f_one_b_more, _ = measure("1f1b", 32)
    assert one_f_one_b < 0.4 * gpipe, (one_f_one_b / BOUNDARY, gpipe / BOUNDARY)
    # 1F1B's bound does not grow with the number of micro-batches (GPipe's grows 4 boundaries per one)
    assert one_f_one_b_more < one_f_one_b + 4 * BOUNDARY, (one_f_one_b_more / BOUNDARY, one_f_one_b / BOUNDARY)
    assert gpipe > 16 * 3 * BOUNDARY


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_real_heap_agrees_with_the_meter_within_working_memory(schedule):
    """Real peak = the meter's per-rank peaks summed, within a stated tolerance.

    The meter counts, per rank, what autograd saves plus the stage inputs it
    keeps (docs/guide/pipeline.md, "What the memory figures count"). Summing the ranks'
    peaks over-counts views of the caller's batch and targets (no new bytes)
    and under-counts each running task's temporaries (at most 3 boundaries a
    rank here). Tolerance: between half the sum and the sum plus 3
    boundaries per rank.
    """
    real, per_rank = measure(schedule, 16)
    predicted = sum(per_rank)
    assert 0.5 * predicted <= real <= predicted + 3 * RANKS * BOUNDARY, (
        real / BOUNDARY, [b / BOUNDARY for b in per_rank])


def test_outputs_collected_by_a_forward_hook_keep_their_data():
    """A stage drops the data of outputs it has sent, but never of one the user's code still holds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)).double()
    collected: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda module, args, out: collected.append(out))
    x = torch.randn(12, 8, dtype=torch.float64)
    with Pipeline(model, schedule="1f1b", balance=[1, 2], devices=["cpu"] * 2, chunks=3,
                  checkpoint="never", loss_fn=nn.MSELoss()) as pipe:
        pipe.step(x, torch.zeros(12, 4, dtype=torch.float64))
    pipelined = collected[:]
    with torch.no_grad():
        expected = model[0](x)
    collected = pipelined
    assert [t.shape for t in collected] == [(4, 8)] * 3
    torch.testing.assert_close(torch.cat(collected).detach(), expected, rtol=0, atol=1e-12)
