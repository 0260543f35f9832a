"""The command line: every command in a real subprocess, and every user mistake as one line, exit 2.

Each subprocess pays for importing torch (a few seconds), so the subprocess
tests are few and share one short demo run; the many bad-value cases call
``main`` in-process, which checks the same code path minus the interpreter
start-up (a couple of them also run in a subprocess to prove the real exit
status and that no traceback reaches the terminal).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import structlog

from pipesched.cli import common as cli
from pipesched.cli.main import main
from pipesched.cli.demo import Progress, train
from pipesched.runtime.cpu_threads import cores_per_rank

#: Small enough that a whole command takes about as long as importing torch.
TINY_COMPARE = ["--steps", "2", "--warmup", "1", "--batch", "16", "--chunks", "4"]
TINY_DEMO = ["--steps", "3", "--batch", "16", "--samples", "64", "--chunks", "4"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipesched", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def run_inline(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``main(args)`` in this process: (exit status, stdout, stderr), argparse's exits included."""
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pipesched"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.fixture(autouse=True)
def _structlog_defaults():
    yield
    structlog.reset_defaults()


# ----------------------------------------------------------- schedule show


def chart_rows(out: str) -> dict[str, list[str]]:
    """``{"rank 0": [cells...]}`` from the chart at the top of ``schedule show``'s output."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("rank ") and "busy" not in line:
            label, _, cells = line.partition("  ")
            rows[label] = cells.split()
    return rows


def test_schedule_show_gpipe_chart_matches_hand_computed_plan() -> None:
    # GPipe, p = 2 ranks, m = 2 micro-batches, F = B = 1. By hand:
    #   t=0 F0.0 | t=1 F0.1, F1.0 | t=2 F1.1 | t=3 B1.1 (backwards in reverse order)
    #   t=4 B1.0, B0.1 (needs B1.1, done at 4) | t=5 B0.0 (needs B1.0, done at 5); makespan 6.
    result = run_cli("schedule", "show", "gpipe", "--stages", "2", "--microbatches", "2")
    assert result.returncode == 0, result.stderr
    assert chart_rows(result.stdout) == {
        "rank 0": ["F0.0", "F0.1", ".", ".", "B0.1", "B0.0"],
        "rank 1": [".", "F1.0", "F1.1", "B1.1", "B1.0", "."],
    }
    out = result.stdout
    assert "simulated makespan    6" in out  # (m + p - 1)(F + B) = 3 * 2
    # idle 2 of 6 per rank: 1/3 of the total, and (p - 1) / m = 1/2 of the ideal
    assert "33.3 % of total" in out and "50.0 % of ideal" in out
    assert "lower bound           4" in out and "66.7 %" in out


def test_schedule_show_draws_long_actions_with_continuation_marks(capsys: pytest.CaptureFixture[str]) -> None:
    # GPipe, p = 2, m = 1, F = 1, B = 2: F0.0 [0,1], F1.0 [1,2], B1.0 [2,4], B0.0 [4,6].
    code, out, _ = run_inline(capsys, "schedule", "show", "gpipe", "--stages", "2", "--microbatches", "1",
                              "--backward-cost", "2")
    assert code == 0
    assert chart_rows(out) == {
        "rank 0": ["F0.0", ".", ".", ".", "B0.0", "-"],
        "rank 1": [".", "F1.0", "B1.0", "-", ".", "."],
    }
    assert "simulated makespan    6" in out


def test_schedule_show_interleaved_defaults_to_two_stages_per_rank(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_inline(capsys, "schedule", "show", "interleaved", "--stages", "4", "--microbatches", "2",
                              "--comm", "0.5")
    assert code == 0
    assert "4 stages on 2 ranks" in out
    assert set(chart_rows(out)) == {"rank 0", "rank 1"}
    assert "one column = 0.5 time units" in out


def test_schedule_list_names_the_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_inline(capsys, "schedule", "list")
    assert code == 0
    assert {"gpipe", "1f1b", "interleaved-1f1b"} <= set(out.split())


# ------------------------------------------------------------ demo, timeline


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_cli("demo", *TINY_DEMO, "--out", str(out)), out


def test_demo_trains_and_writes_its_outputs(demo_run) -> None:
    result, out = demo_run
    assert result.returncode == 0, result.stderr
    assert "step    3/3" in result.stdout  # the plain progress lines (no terminal here)
    assert f"{cores_per_rank(2)} intra-op thread(s) per rank" in result.stdout
    assert "intra-op threads each" not in result.stderr  # no oversubscription warning
    log = out / "timeline.jsonl"
    assert f"wrote {log}" in result.stdout and f"wrote {out / 'trace.json'}" in result.stdout
    events = [json.loads(line) for line in log.read_text().splitlines()]
    tasks = [e for e in events if e["event"] == "task"]
    assert len(tasks) == 2 * 4 * 2  # 2 stages x 4 mbs x F/B
    assert {e["event"] for e in events} == {"task", "memory"}  # and each rank's peak bytes
    assert len({e["step"] for e in events}) == 1  # --log-steps 1: only the last step
    if cli.matplotlib_missing():
        assert "skipped the Gantt chart" in result.stdout
    else:
        assert (out / "gantt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_reads_the_demo_log_and_writes_a_valid_chrome_trace(demo_run, tmp_path: Path) -> None:
    _, out = demo_run
    trace, gantt = tmp_path / "trace.json", tmp_path / "gantt.png"
    args = ["timeline", str(out / "timeline.jsonl"), "--chrome", str(trace)]
    if not cli.matplotlib_missing():
        args += ["--gantt", str(gantt)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "measured makespan" in result.stdout and "runtime efficiency" in result.stdout
    assert f"wrote {trace}" in result.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    tasks = [e for e in events if e["ph"] == "X"]
    assert len(tasks) == 16
    assert {e["tid"] for e in tasks} == {0, 1}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in tasks)
    if not cli.matplotlib_missing():
        assert gantt.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_json_is_the_analysis(demo_run, capsys: pytest.CaptureFixture[str]) -> None:
    _, out = demo_run
    code, stdout, _ = run_inline(capsys, "timeline", str(out / "timeline.jsonl"), "--json")
    assert code == 0
    analysis = json.loads(stdout)
    assert analysis["num_ranks"] == 2 and analysis["num_tasks"] == 16
    assert 0.0 <= analysis["bubble_over_total"] < 1.0


# ------------------------------------------------------------------ compare


def test_compare_json_has_one_row_per_schedule_with_matching_gradients() -> None:
    result = run_cli("compare", *TINY_COMPARE, "--json")
    assert result.returncode == 0, result.stderr
    assert "intra-op threads each" not in result.stderr  # it picked the thread count: no oversubscription
    rows = json.loads(result.stdout)
    assert {r["threads_per_rank"] for r in rows} == {cores_per_rank(2)}
    # the default: every registered schedule that fits 2 ranks, the split-backward family included
    assert [r["schedule"] for r in rows] == [
        "gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "zb-h1", "zb-v", "interleaved-zb", "dualpipe-v", "auto"]
    assert [r["stages"] for r in rows] == [2, 2, 4, 4, 2, 4, 4, 4, 2]
    for row in rows:
        # W time: only schedules that split the backward run W tasks (auto: whichever plan it synthesised)
        splits = row["schedule"] in ("zb-h1", "zb-v", "interleaved-zb", "dualpipe-v")
        if row["schedule"] != "auto":
            assert (row["weight_time_s"] > 0) == splits, row
        assert row["backward_time_s"] > 0
        assert row["grads_match"] is True, row
        assert row["samples_per_s"] > 0 and row["step_time_s"] > 0
        assert len(row["peak_inflight"]) == len(row["peak_activation_bytes"]) == 2
    # 1F1B bounds in-flight micro-batches by p - r, GPipe keeps all m
    assert rows[0]["peak_inflight"] == [4, 4] and rows[1]["peak_inflight"] == [2, 1]


def test_compare_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_inline(capsys, "compare", *TINY_COMPARE, "--schedules", "1f1b,zb-h1")
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("schedule"))
    assert "samples/s" in header and "grads match" in header and "B / W ms" in header
    row = next(line for line in out.splitlines() if line.startswith("1f1b"))
    assert row.split()[-1] == "yes"
    assert re.search(r"[0-9.]+ / -", row), row  # 1F1B runs no W
    split = next(line for line in out.splitlines() if line.startswith("zb-h1"))
    assert split.split()[-1] == "yes"
    assert re.search(r"[0-9.]+ / [0-9.]+", split), split  # ZB-H1's W time is shown
    assert "1f1b:" in err  # progress goes to stderr, leaving stdout to the table


# ------------------------------------------------------------------- errors


def test_bad_flag_in_a_subprocess_is_one_line_and_exit_2() -> None:
    result = run_cli("schedule", "show", "gpipe", "--stages", "zero", "--microbatches", "2")
    assert_one_line_error(result.returncode, result.stderr, "--stages")


def test_refused_shape_in_a_subprocess_is_one_line_and_exit_2() -> None:
    result = run_cli("schedule", "show", "interleaved-1f1b", "--stages", "6", "--microbatches", "4",
                     "--ranks", "4")
    assert_one_line_error(result.returncode, result.stderr, "multiple", "--ranks 4")
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "COMMAND"),
        (["schedule"], "ACTION"),
        (["schedule", "show", "nope", "--stages", "2", "--microbatches", "2"], "unknown schedule 'nope'"),
        (["schedule", "show", "gpipe", "--microbatches", "2"], "--stages"),
        (["schedule", "show", "gpipe", "--stages", "2", "--microbatches", "0"], "--microbatches"),
        (["schedule", "show", "gpipe", "--stages", "2", "--microbatches", "2", "--forward-cost", "0"],
         "--forward-cost"),
        (["schedule", "show", "gpipe", "--stages", "2", "--microbatches", "2", "--comm", "nan"], "--comm"),
        (["schedule", "show", "gpipe", "--stages", "3", "--microbatches", "2", "--ranks", "2"],
         "one stage per rank"),
        (["schedule", "show", "interleaved", "--stages", "5", "--microbatches", "2"], "pass --ranks"),
        (["compare", "--chunks", "0"], "--chunks"),
        (["compare", "--schedules", "gpipe,nope"], "unknown schedule 'nope'"),
        (["compare", "--schedules", ","], "--schedules"),
        (["compare", "--model", "resnet"], "--model"),
        (["compare", "--ranks", "6"], "--ranks"),
        (["compare", "--chunks", "32", "--batch", "16"], "--batch"),
        (["demo", "--steps", "2", "--log-steps", "3"], "--log-steps"),
        (["demo", "--schedule", "interleaved", "--ranks", "4", "--blocks", "2"], "--blocks"),
        (["demo", "--schedule", "bogus"], "unknown schedule"),
        (["timeline"], "LOG.jsonl"),
        (["timeline", "missing.jsonl"], "no such log file"),
        (["timeline", "missing.jsonl", "--step", "-1"], "--step"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args, needle
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_inline(capsys, *args)
    assert_one_line_error(code, err, needle)


def test_timeline_errors_name_the_problem(capsys, tmp_path: Path, demo_run) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event": "task"}\nnot json\n')
    assert_one_line_error(*run_inline(capsys, "timeline", str(bad))[::2], "bad.jsonl:2 is not JSON")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_one_line_error(*run_inline(capsys, "timeline", str(empty))[::2], "no task events")
    assert_one_line_error(*run_inline(capsys, "timeline", str(tmp_path))[::2], "cannot read")
    log = str(demo_run[1] / "timeline.jsonl")
    assert_one_line_error(*run_inline(capsys, "timeline", log, "--step", "999")[::2], "999")
    code, out, err = run_inline(capsys, "timeline", log, "--chrome", str(tmp_path / "no" / "dir.json"))
    assert_one_line_error(code, err, "cannot write")
    assert out == ""  # nothing printed before the failure


def test_gantt_without_matplotlib_says_how_to_get_it(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, _, err = run_inline(capsys, "timeline", "any.jsonl", "--gantt", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, "--gantt needs matplotlib", "pipesched[plot]")


def test_demo_out_that_is_a_file_is_a_user_error(capsys, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_inline(capsys, "demo", *TINY_DEMO, "--out", str(blocker / "sub"))
    assert_one_line_error(code, err, "--out")


# ------------------------------------------------------------- demo pieces


def test_train_logs_only_the_last_steps_and_resets_structlog(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    configured_during = []

    def step() -> float:
        configured_during.append(structlog.is_configured())
        return 1.0

    train(step, steps=4, log_steps=2, log=log)
    assert configured_during == [False, False, True, True]
    assert not structlog.is_configured()
    assert log.exists()


def test_progress_uses_tqdm_on_a_terminal_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    updates = []

    class FakeBar:
        def __init__(self, total, **kwargs):
            self.total = total

        def update(self, n):
            updates.append(n)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            updates.append("closed")

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeBar))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    progress = Progress(3)
    for step in (1, 2, 3):
        progress.update(step, 0.5)
    progress.close()
    assert updates == [1, 1, 1, "closed"]


def test_progress_prints_lines_without_a_terminal(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    progress = Progress(20)
    for step in range(1, 21):
        progress.update(step, 0.25)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  step    1/20  loss 0.2500"
    assert len(lines) == 11  # step 1, then every 2nd step (10 %)


def test_compare_threads_flag_sets_each_ranks_intra_op_threads(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    before = torch.get_num_threads()
    code, out, _ = run_inline(capsys, "compare", *TINY_COMPARE, "--schedules", "1f1b", "--threads", "3", "--json")
    assert code == 0
    assert [row["threads_per_rank"] for row in json.loads(out)] == [3]
    assert torch.get_num_threads() == before  # the process is left as it was


def test_compare_what_if_puts_the_planners_prediction_beside_the_measured_step(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_inline(capsys, "compare", *TINY_COMPARE, "--schedules", "1f1b,auto", "--what-if")
    assert code == 0
    table = out[out.index("what-if:"):]
    header = next(line for line in table.splitlines() if line.startswith("schedule"))
    assert "predicted" in header and "measured" in header and "pred/meas" in header
    assert re.search(r"^1f1b\s+\S+\s+[0-9.]+ ms\s+[0-9.]+ ms\s+[0-9.]+", table, re.M), table
    assert re.search(r"^auto\s+\S+\s+[0-9.]+ ms", table, re.M) and "fastest predicted:" in table
    code, out, _ = run_inline(capsys, "compare", *TINY_COMPARE, "--schedules", "1f1b", "--what-if", "--json")
    (row,) = json.loads(out)
    assert row["predicted_step_s"] > 0 and row["balance"] and sum(row["balance"]) == 11
