"""Never worse than torch 2.13: our orders against torch's own, replayed by the same simulator.

A fast subset of ``benchmarks/zero_bubble_yardstick.py`` (which sweeps every
shape torch builds): torch's ``pipeline_order`` is read from its schedule
classes, built with stand-in stages (no process group), and both plans are
priced with the same F = B = W = 1 costs.
"""

from __future__ import annotations

import pytest

from benchmarks.zero_bubble_yardstick import TorchRefuses, compare, torch_plan
from pipesched import validate_plan

SUBSET = [
    ("zb-h1", 2, 2, 1), ("zb-h1", 4, 4, 1), ("zb-h1", 4, 10, 1), ("zb-h1", 8, 16, 1),
    ("zb-v", 2, 4, 2), ("zb-v", 4, 8, 2), ("zb-v", 4, 13, 2),
    ("interleaved-zb", 2, 4, 2), ("interleaved-zb", 4, 8, 3), ("interleaved-zb", 4, 6, 2),
    ("looped-bfs", 2, 3, 2), ("looped-bfs", 4, 8, 4),
    ("dualpipe-v", 2, 4, 2), ("dualpipe-v", 4, 8, 2), ("dualpipe-v", 4, 11, 2),
]


@pytest.mark.parametrize("name,p,m,v", SUBSET)
def test_as_fast_as_torch_with_no_more_in_flight(name, p, m, v):
    row = compare(name, p, m, v)
    assert row.torch is not None
    assert row.ours <= row.torch, row
    assert all(ours <= theirs for ours, theirs in zip(row.ours_peak, row.torch_peak)), row
    assert row.bound <= row.ours


def test_torchs_orders_are_read_faithfully():
    """torch's ZB-H1 order, by hand for p = 2, m = 2 (rank 1 runs its W's one backward late)."""
    plan = torch_plan("zb-h1", 2, 2, 1)
    assert [[str(a) for a in row] for row in plan] == [
        ["F0.0", "F0.1", "B0.0", "W0.0", "B0.1", "W0.1"],
        ["F1.0", "B1.0", "F1.1", "B1.1", "W1.0", "W1.1"],
    ]
    validate_plan(plan, 2, 2, 2, [0, 1])
    with pytest.raises(TorchRefuses, match="at least as many microbatches as stages"):
        torch_plan("dualpipe-v", 4, 4, 2)


@pytest.mark.parametrize(
    "name,p,m,v,scenario",
    [
        ("zb-v", 4, 4, 2, "equal"),        # torch pads to 2p - 1 virtual micro-batches: 30; ours 27
        ("zb-v", 4, 8, 2, "heavy-last"),   # last stage twice as costly: torch 73, ours 72 (the bound)
        ("zb-h1", 4, 4, 1, "comm"),        # half a forward per hop: torch 20, ours 18
        ("interleaved-zb", 4, 4, 2, "comm"),
    ],
)
def test_strictly_faster_where_torchs_order_is_off_the_bound(name, p, m, v, scenario):
    row = compare(name, p, m, v, scenario)
    assert row.torch is not None and row.torch > row.bound
    assert row.bound <= row.ours < row.torch, row
    assert max(row.ours_peak) <= max(row.torch_peak), row


@pytest.mark.parametrize("name,p,m,v", [("zb-h1", 4, 9, 1), ("interleaved-zb", 4, 9, 2), ("dualpipe-v", 4, 5, 2)])
def test_we_run_shapes_torch_refuses(name, p, m, v):
    """m not a multiple of the rounds (torch's interleaved zero bubble), m < 2p (torch's DualPipeV)."""
    row = compare(name, p, m, v)
    assert row.torch is None and row.ours >= row.bound
