"""W actions in what users look at: ``pipesched schedule show``, timelines, Chrome traces, Gantt charts."""

from __future__ import annotations

import pytest

from pipesched import Timeline, get_schedule, simulate
from pipesched.cli.main import main
from pipesched.observe.export import CATEGORY, COLORS
from pipesched.plan.chart import build_chart
from pipesched.plan.greedy import unit_costs


def run_inline(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def chart_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        if line.startswith("rank ") and "busy" not in line:
            label, _, cells = line.partition("  ")
            rows[label] = cells.split()
    return rows


def test_schedule_show_draws_w_and_prices_it_like_b_by_default(capsys):
    # ZB-H1, p = 2, m = 2, F = B = W = 1, by hand:
    #   rank 0: F0.0 F0.1 .    B0.0 W0.0 B0.1 W0.1        (its W's right after their B: delay 0)
    #   rank 1: .    F1.0 B1.0 F1.1 B1.1 W1.0 W1.1        (one backward late: delay 1)
    # makespan m(F + B + W) + (p - 1)(F + B - W) = 6 + 1 = 7
    code, out, _ = run_inline(capsys, "schedule", "show", "zb-h1", "--stages", "2", "--microbatches", "2")
    assert code == 0
    assert chart_rows(out) == {
        "rank 0": ["F0.0", "F0.1", ".", "B0.0", "W0.0", "B0.1", "W0.1"],
        "rank 1": [".", "F1.0", "B1.0", "F1.1", "B1.1", "W1.0", "W1.1"],
    }
    assert "costs F=1 B=1 W=1 comm=0" in out
    assert "simulated makespan    7" in out


def test_weight_cost_flag_prices_unsplit_backwards_as_b_plus_w(capsys):
    # 1F1B, p = 2, m = 2, F = 1, B = 1, W = 2: each backward costs 3, makespan (m + p - 1)(F + B + W) = 12
    code, out, _ = run_inline(capsys, "schedule", "show", "1f1b", "--stages", "2", "--microbatches", "2",
                              "--weight-cost", "2")
    assert code == 0
    assert "costs F=1 B=1 W=2 comm=0" in out and "simulated makespan    12" in out
    # without the flag 1F1B charts as before: no W in the costs line
    code, out, _ = run_inline(capsys, "schedule", "show", "1f1b", "--stages", "2", "--microbatches", "2")
    assert "costs F=1 B=1 comm=0" in out and "simulated makespan    6" in out


def test_weight_cost_joins_the_chart_quantum():
    chart = build_chart("zb-h1", 2, 2, weight_cost=0.5)
    assert chart.weight_cost == 0.5
    from pipesched.plan.chart import format_chart

    assert "one column = 0.5 time units" in format_chart(chart)


def test_bad_weight_cost_is_one_line(capsys):
    code, _, err = run_inline(capsys, "schedule", "show", "zb-h1", "--stages", "2", "--microbatches", "2",
                              "--weight-cost", "0")
    assert code == 2 and "--weight-cost" in err and "Traceback" not in err


def test_zero_bubble_defaults_rank_count_from_the_schedule(capsys):
    code, out, _ = run_inline(capsys, "schedule", "show", "zb-v", "--stages", "8", "--microbatches", "8")
    assert code == 0 and "8 stages on 4 ranks" in out
    assert set(chart_rows(out)) == {"rank 0", "rank 1", "rank 2", "rank 3"}


def zb_timeline() -> Timeline:
    plan = get_schedule("zb-h1").plan(3, 4, 3)
    return Timeline(simulate(plan, unit_costs(3)).records(), schedule="zb-h1")


def test_timeline_analysis_of_a_split_run():
    timeline = zb_timeline()
    analysis = timeline.analyze()
    # a simulated run has no overhead, and ZB-H1 at F = B = W: m(F+B+W) + (p-1)(F+B-W) = 12 + 2
    assert analysis.measured_makespan == analysis.replay_makespan == 14.0
    assert analysis.runtime_efficiency == 1.0
    assert analysis.stage_work == [12.0, 12.0, 12.0]  # F + B + W of 4 micro-batches per stage
    assert analysis.peak_inflight == [3, 3, 3]  # held until the W: p on every rank
    assert analysis.num_tasks == 36


def test_chrome_trace_gives_w_its_own_category():
    trace = zb_timeline().to_chrome_trace()
    tasks = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    by_kind = {e["args"]["kind"]: e["cat"] for e in tasks}
    assert by_kind == {"F": "forward", "B": "backward", "W": "weight"}
    assert any(e["name"] == "W2.0" for e in tasks)
    assert len(set(COLORS.values())) == 3 and set(COLORS) == set(CATEGORY) == {"F", "B", "W"}


def test_gantt_png_draws_w(tmp_path):
    pytest.importorskip("matplotlib")
    path = zb_timeline().to_gantt_png(tmp_path / "zb.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
