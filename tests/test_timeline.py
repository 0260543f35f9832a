"""Timeline: from a real step, its log and synthetic records, to the numbers and the exports."""

from __future__ import annotations

import io
import json
import math
import sys
import warnings
from collections import defaultdict

import pytest
import structlog
import structlog.testing
import torch
from torch import nn

from pipesched import Action, Pipeline, TaskRecord
from pipesched.plan.lowering import dependencies
from pipesched.plan.simulate import simulate
from pipesched.observe.timeline import Timeline, TimelineAnalysis, configure_jsonl_logging
from pipesched.observe.export import STEP_TRACK, chrome_trace_steps
from pipesched.observe.units import nbytes, seconds

CHUNKS = 4


@pytest.fixture(autouse=True)
def _structlog_defaults():
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    pipeline = Pipeline(model, schedule="1f1b", devices=["cpu", "cpu"], chunks=CHUNKS, loss_fn=nn.MSELoss())
    yield pipeline
    pipeline.close()


def batch():
    return torch.randn(8, 16), torch.randn(8, 16)


def busy_by_rank(tasks, num_ranks):
    totals = [0.0] * num_ranks
    for t in tasks:
        totals[t.rank] += t.end - t.start
    return totals


def rows(tasks):
    return sorted((t.rank, t.stage, t.microbatch, t.kind, t.start, t.end) for t in tasks)


def input_overlap(tasks, num_stages):
    """Sum of the seconds by which tasks started before an input's producer's recorded end.

    Zero when every task's end is recorded before its output is posted; a
    replay on measured durations waits for every recorded end.
    """
    by_action = {Action(t.kind, t.stage, t.microbatch): t for t in tasks}
    slack = 0.0
    for action, task in by_action.items():
        for dep in dependencies(action, num_stages):
            slack += max(0.0, by_action[dep].end - task.start)
    return slack


# ----------------------------------------------------------------- real steps


def test_jsonl_round_trip_matches_the_reports(pipe, tmp_path):
    log = tmp_path / "run.jsonl"
    file = configure_jsonl_logging(log)
    try:
        pipe.step(*batch())
        first = pipe.last_report
        pipe.step(*batch())
        second = pipe.last_report
    finally:
        structlog.reset_defaults()
        file.close()

    first_step = json.loads(log.read_text().splitlines()[0])["step"]
    for step, report in ((None, second), (first_step, first)):
        timeline = Timeline.from_jsonl(log, step=step)
        assert len(timeline.tasks) == 2 * 2 * CHUNKS  # F and B of 2 stages x 4 micro-batches
        assert rows(timeline.tasks) == rows(report.tasks)
        expected_busy = busy_by_rank(report.tasks, 2)
        analysis = timeline.analyze()
        assert analysis.busy_seconds == pytest.approx(expected_busy, rel=1e-12)
        measured = max(t.end for t in report.tasks) - min(t.start for t in report.tasks)
        assert analysis.measured_makespan == pytest.approx(measured, rel=1e-12)
        assert analysis.busy_fraction == pytest.approx([b / measured for b in expected_busy])
        assert analysis.peak_inflight == [2, 1]  # 1F1B: min(m, p - r)
        # the log carries the report's memory figures: the table read back is the live one
        assert analysis.peak_activation_bytes == report.peak_activation_bytes
        assert analysis.format_table() == Timeline.from_report(report).analyze().format_table()
    # Other lines in the file (none here) and the level field do not disturb parsing.
    assert {json.loads(line)["event"] for line in log.read_text().splitlines()} == {"task", "memory"}


def test_timeline_from_a_log_shows_the_peak_activation_bytes_not_n_a(pipe, tmp_path):
    """The bug: `pipesched timeline LOG` printed "n/a" for the peak activations the live report showed."""
    log = tmp_path / "run.jsonl"
    file = configure_jsonl_logging(log)
    try:
        pipe.step(*batch())
    finally:
        structlog.reset_defaults()
        file.close()
    report = pipe.last_report
    assert min(report.peak_activation_bytes) > 0
    logged = Timeline.from_jsonl(log).analyze()
    assert logged.peak_activation_bytes == report.peak_activation_bytes
    last_row = logged.format_table().splitlines()[-1]
    assert "n/a" not in last_row and last_row.endswith(nbytes(report.peak_activation_bytes[1]))


def test_from_events_of_captured_logs(pipe):
    with structlog.testing.capture_logs() as events:
        pipe.step(*batch())
    report = pipe.last_report
    timeline = Timeline.from_events(events)
    assert rows(timeline.tasks) == rows(report.tasks)
    assert timeline.analyze().schedule == "1f1b"  # the events name their schedule
    assert isinstance(timeline.step, int)


def test_from_report_analysis_of_a_real_step(pipe):
    pipe.step(*batch())
    report = pipe.last_report
    analysis = Timeline.from_report(report).analyze()
    assert analysis.schedule == "1f1b"
    assert analysis.num_tasks == len(report.tasks) == 16
    assert analysis.peak_activation_bytes == report.peak_activation_bytes
    assert analysis.peak_inflight == report.peak_inflight == [2, 1]
    measured = max(t.end for t in report.tasks) - min(t.start for t in report.tasks)
    # regression: a task's end is recorded before its output is posted, so no task
    # starts before its input's producer ended, and the replay is never slower
    assert input_overlap(report.tasks, report.num_stages) == 0.0
    assert 0.0 < analysis.replay_makespan <= measured + 1e-9
    assert 0.0 < analysis.runtime_efficiency <= 1.0 + 1e-9
    assert 0.0 < analysis.lower_bound <= analysis.replay_makespan + 1e-12
    assert 0.0 < analysis.schedule_efficiency <= 1.0 + 1e-12
    stage_work = [sum(t.end - t.start for t in report.tasks if t.stage == s) for s in range(2)]
    assert analysis.stage_balance == pytest.approx(sum(stage_work) / 2 / max(stage_work))
    json.dumps(analysis.as_dict())
    assert "rank" in analysis.format_table()


def test_chrome_trace_of_a_real_step(pipe, tmp_path):
    pipe.step(*batch())
    report = pipe.last_report
    path = tmp_path / "trace.json"
    returned = Timeline.from_report(report).to_chrome_trace(path)
    trace = json.loads(path.read_text())
    assert trace == json.loads(json.dumps(returned))
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == len(report.tasks)
    assert sorted(e["name"] for e in complete) == sorted(
        f"{t.kind}{t.stage}.{t.microbatch}" for t in report.tasks
    )
    origin = min(t.start for t in report.tasks)
    by_name = {f"{t.kind}{t.stage}.{t.microbatch}": t for t in report.tasks}
    for event in complete:
        task = by_name[event["name"]]
        assert event["pid"] == 0 and event["tid"] == task.rank
        assert event["ts"] == pytest.approx((task.start - origin) * 1e6)
        assert event["dur"] == pytest.approx((task.end - task.start) * 1e6)
        assert event["args"] == {"stage": task.stage, "microbatch": task.microbatch, "kind": task.kind}
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert names == {0: "rank 0", 1: "rank 1", STEP_TRACK: "steps"}


# ------------------------------------------------------------ synthetic, by hand


def synthetic() -> list[TaskRecord]:
    """GPipe, p = 2, m = 2, with overhead between tasks. Durations: F0 1, B0 2, F1 3, B1 1.

    rank 0: F0.0 [0,1]  F0.1 [1,2]                                    B0.1 [10,12]  B0.0 [12,14]
    rank 1:         F1.0 [1.5,4.5]  F1.1 [4.5,7.5]  B1.1 [7.5,8.5]  B1.0 [8.5,9.5]
    """
    t0 = 500.0  # absolute clock values are arbitrary
    spans = [
        (0, 0, 0, "F", 0, 1), (0, 0, 1, "F", 1, 2), (0, 0, 1, "B", 10, 12), (0, 0, 0, "B", 12, 14),
        (1, 1, 0, "F", 1.5, 4.5), (1, 1, 1, "F", 4.5, 7.5), (1, 1, 1, "B", 7.5, 8.5), (1, 1, 0, "B", 8.5, 9.5),
    ]
    return [TaskRecord(r, s, m, k, t0 + a, t0 + b) for r, s, m, k, a, b in spans]


def test_synthetic_analysis_by_hand():
    analysis = Timeline(synthetic(), schedule="gpipe").analyze()
    assert isinstance(analysis, TimelineAnalysis)
    assert analysis.measured_makespan == 14.0
    assert analysis.busy_seconds == [6.0, 8.0]
    assert analysis.busy_fraction == pytest.approx([6 / 14, 8 / 14])
    assert analysis.idle_fraction == pytest.approx([8 / 14, 6 / 14])
    assert analysis.bubble_over_total == pytest.approx((8 + 6) / (2 * 14))
    assert analysis.bubble_over_ideal == pytest.approx((8 + 6) / (6 + 8))
    # Replay with no overhead: F1.0 [1,4], F1.1 [4,7], B1.1 [7,8], B1.0 [8,9], B0.1 [8,10], B0.0 [10,12].
    assert analysis.replay_makespan == pytest.approx(12.0)
    assert analysis.runtime_efficiency == pytest.approx(12 / 14)
    # Work bound: rank 1 does 8; chain bound: 1 + 3 + 1 + 2 = 7.
    assert analysis.lower_bound == pytest.approx(8.0)
    assert analysis.schedule_efficiency == pytest.approx(8 / 12)
    # Stage work 6 and 8: mean 7 / max 8.
    assert analysis.stage_work == [6.0, 8.0]
    assert analysis.stage_balance == pytest.approx(7 / 8)
    assert analysis.peak_inflight == [2, 2]
    assert analysis.peak_activation_bytes is None
    table = analysis.format_table()
    assert "85.7 %" in table  # runtime efficiency
    assert "n/a" in table  # no activation bytes
    assert json.loads(json.dumps(analysis.as_dict()))["busy_seconds"] == [6.0, 8.0]


def test_what_if_replay_of_another_schedule():
    # The same task times under 1F1B: rank 0 F0.0 [0,1] F0.1 [1,2] B0.0 [5,7] B0.1 [9,11];
    # rank 1 F1.0 [1,4] B1.0 [4,5] F1.1 [5,8] B1.1 [8,9].
    analysis = Timeline(synthetic()).analyze(schedule="1f1b")
    assert analysis.what_if == "1f1b"
    assert analysis.predicted_makespan == pytest.approx(11.0)
    assert analysis.predicted_speedup == pytest.approx(12.0 / 11.0)  # recorded-order replay / 1F1B replay
    # the measured run's own figures are untouched by the what-if
    assert analysis.replayed == "recorded order"
    assert analysis.replay_makespan == pytest.approx(12.0)
    assert analysis.runtime_efficiency == pytest.approx(12 / 14)
    assert analysis.peak_inflight == [2, 2]  # still what the records show
    with pytest.raises(ValueError, match="different actions"):
        Timeline(synthetic()[:4] + synthetic()[4:7]).analyze(schedule="1f1b")


def test_what_if_is_a_prediction_not_a_runtime_efficiency_over_100_percent():
    """The bug: replaying another schedule printed "runtime efficiency 111 %" for a run with no overhead."""
    from pipesched import get_schedule

    costs = {("F", 0): 1.0, ("F", 1): 3.0, ("B", 0): 2.0, ("B", 1): 1.0}
    sim = simulate(get_schedule("gpipe").plan(2, 4, 2), costs)
    analysis = Timeline(sim.records(), schedule="gpipe").analyze(schedule="1f1b")
    assert analysis.runtime_efficiency == pytest.approx(1.0)  # the measured (here: simulated) run is perfect
    assert analysis.predicted_makespan < analysis.replay_makespan  # 1F1B would be shorter on these times
    table = analysis.format_table()
    efficiency = next(line for line in table.splitlines() if line.startswith("runtime efficiency"))
    assert "100.0 %" in efficiency
    assert "PREDICTED" in table and "not measured" in table
    percents = [float(word) for line in table.splitlines() for word, unit in zip(line.split(), line.split()[1:])
                if unit == "%" and word.replace(".", "").isdigit()]
    assert max(percents) <= 100.0 + 1e-9


def test_simulated_records_have_perfect_runtime_efficiency():
    from pipesched import get_schedule

    plan = get_schedule("1f1b").plan(3, 6, 3)
    sim = simulate(plan, lambda kind, stage: 1.0 if kind == "F" else 2.0)
    analysis = Timeline(sim.records()).analyze()
    assert analysis.measured_makespan == pytest.approx((6 + 3 - 1) * 3.0)
    assert analysis.runtime_efficiency == pytest.approx(1.0)
    assert analysis.peak_inflight == [3, 2, 1]


def test_half_a_step_has_no_replay():
    backward_only = [t for t in synthetic() if t.kind == "B"]
    analysis = Timeline(backward_only).analyze()
    assert analysis.replay_makespan is None and analysis.runtime_efficiency is None
    assert analysis.busy_seconds == [4.0, 2.0]
    assert "n/a" in analysis.format_table()


# -------------------------------------------------------------- logs and errors


def event(step, rank, stage, mb, kind, start, end, name="task"):
    return {"event": name, "step": step, "rank": rank, "stage": stage, "microbatch": mb, "kind": kind,
            "start": start, "end": end, "level": "info"}


def test_from_jsonl_picks_steps_and_skips_other_events(tmp_path):
    lines = [
        {"event": "starting", "level": "info"},
        event(0, 0, 0, 0, "F", 0.0, 1.0), event(0, 0, 0, 0, "B", 1.0, 3.0),
        {"event": "epoch done", "level": "info"},
        event(1, 0, 0, 0, "F", 10.0, 10.5), event(1, 0, 0, 0, "B", 10.5, 11.0),
    ]
    log = tmp_path / "mixed.jsonl"
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert Timeline.from_jsonl(log).busy() == [1.0]  # last step by default
    assert Timeline.from_jsonl(log, step=0).busy() == [3.0]
    with pytest.raises(ValueError, match=r"step=7 is not among the logged steps \(0, 1\)"):
        Timeline.from_jsonl(log, step=7)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[1]) + "\nrank=0 stage=0\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not JSON"):
        Timeline.from_jsonl(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(ValueError, match="no task events"):
        Timeline.from_jsonl(empty)


def test_configure_jsonl_logging_to_an_open_file():
    sink = io.StringIO()
    assert configure_jsonl_logging(sink) is sink
    assert structlog.is_configured()
    structlog.get_logger("pipesched").info("task", step=3, **TaskRecord(1, 1, 0, "F", 2.0, 2.5).as_dict())
    structlog.reset_defaults()
    timeline = Timeline.from_events(json.loads(line) for line in sink.getvalue().splitlines())
    assert timeline.step == 3
    assert rows(timeline.tasks) == [(1, 1, 0, "F", 2.0, 2.5)]
    with pytest.raises(TypeError, match="path or a text file"):
        configure_jsonl_logging(42)  # type: ignore[arg-type]


def test_closed_log_file_warns_and_never_fails_a_step(tmp_path):
    """The bug: closing configure_jsonl_logging's file made every later step fail and roll back."""
    from conftest import assert_grads_equal, mlp, reference_grads

    model = mlp(layers=6)
    x = torch.randn(8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    loss_fn = nn.CrossEntropyLoss()
    ref_loss, ref_grads = reference_grads(model, loss_fn, x, y)
    configure_jsonl_logging(tmp_path / "run.jsonl").close()  # "the caller may close" it
    with Pipeline(model, schedule="1f1b", balance=[3, 3], chunks=4, loss_fn=loss_fn) as pipe:
        with pytest.warns(RuntimeWarning, match=r"could not log its 'task' events \(ValueError: I/O operation "
                                                r"on closed file.*\); the step itself succeeded"):
            loss = pipe.step(x, y)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        assert_grads_equal(model, ref_grads)
        assert len(pipe.last_report.tasks) == 2 * 2 * 4
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same failure is warned about once per pipeline
            pipe.step(x, y)
    assert_grads_equal(model, [2 * g for g in ref_grads])


def test_log_tasks_false_keeps_task_events_out_of_the_applications_log():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
    with Pipeline(model, schedule="1f1b", devices=["cpu", "cpu"], chunks=CHUNKS, loss_fn=nn.MSELoss(),
                  log_tasks=False) as quiet, structlog.testing.capture_logs() as events:
        structlog.get_logger("app").info("epoch", n=1)
        quiet.step(*batch())
        assert len(quiet.last_report.tasks) == 2 * 2 * CHUNKS  # the report does not depend on logging
        quiet.log_tasks = True  # a switch, not a construction-time choice
        quiet.step(*batch())
    assert [e["event"] for e in events] == ["epoch"] + ["task"] * (2 * 2 * CHUNKS) + ["memory"] * 2


def test_construction_errors():
    with pytest.raises(ValueError, match="run pipe.step"):
        Timeline.from_report(None)
    with pytest.raises(ValueError, match="at least one task"):
        Timeline([])
    with pytest.raises(ValueError, match="appears twice.*step="):
        Timeline(synthetic() + synthetic()[:1])
    with pytest.raises(ValueError, match="lacks end"):
        Timeline.from_events([{"event": "task", "rank": 0, "stage": 0, "microbatch": 0, "kind": "F", "start": 0}])
    with pytest.raises(ValueError, match="num_ranks must be an int >= 2"):
        Timeline(synthetic(), num_ranks=1)


# -------------------------------------------------------------------- Gantt PNG


def test_gantt_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = Timeline(synthetic(), schedule="gpipe").to_gantt_png(tmp_path / "gantt.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gantt_png_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.patches"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"install pipesched\[plot\] or pip install matplotlib"):
        Timeline(synthetic()).to_gantt_png(tmp_path / "gantt.png")
    assert not (tmp_path / "gantt.png").exists()


def test_busy_helper_matches_independent_sum():
    tasks = synthetic()
    expected = defaultdict(float)
    for t in tasks:
        expected[t.rank] += t.end - t.start
    assert Timeline(tasks).busy() == [expected[0], expected[1]]
    assert math.isclose(Timeline(tasks).makespan, 14.0)


# ------------------------------------------------------ every logged step, one trace


def logged_steps_of(pipe, tmp_path, count):
    """``count`` steps logged to a JSON-lines file, with a pause between them (the "optimizer")."""
    import time

    log = tmp_path / "run.jsonl"
    file = configure_jsonl_logging(log)
    reports = []
    try:
        for _ in range(count):
            pipe.step(*batch())
            reports.append(pipe.last_report)
            time.sleep(0.002)  # the training loop's own work between steps
    finally:
        structlog.reset_defaults()
        file.close()
    return log, reports


def spans(events, category):
    """(name, begin µs, end µs, args) of the steps track's B/E pairs of ``category``."""
    begins = [e for e in events if e.get("cat") == category and e["ph"] == "B"]
    ends = [e for e in events if e.get("cat") == category and e["ph"] == "E"]
    assert [b["name"] for b in begins] == [e["name"] for e in ends]
    assert all(e["tid"] == STEP_TRACK for e in begins + ends)
    return [(b["name"], b["ts"], e["ts"], b["args"]) for b, e in zip(begins, ends)]


def test_chrome_trace_of_every_logged_step(pipe, tmp_path):
    log, reports = logged_steps_of(pipe, tmp_path, 3)
    timelines = Timeline.steps_from_jsonl(log)
    assert [len(t.tasks) for t in timelines] == [16, 16, 16]
    assert [t.peak_activation_bytes for t in timelines] == [r.peak_activation_bytes for r in reports]
    trace = json.loads(json.dumps(chrome_trace_steps(timelines, tmp_path / "trace.json")))
    assert trace == json.loads((tmp_path / "trace.json").read_text())
    events = trace["traceEvents"]
    origin = min(t.start for t in reports[0].tasks)
    # one complete event per task of every step, at its logged time
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 3 * 16
    expected = sorted(((t.start - origin) * 1e6, t.rank, f"{t.kind}{t.stage}.{t.microbatch}")
                      for r in reports for t in r.tasks)
    got = sorted((e["ts"], e["tid"], e["name"]) for e in complete)
    assert [g[1:] for g in got] == [x[1:] for x in expected]
    assert [g[0] for g in got] == pytest.approx([x[0] for x in expected])
    # each step a slice on the steps track, holding exactly its own tasks, boundaries marked
    steps = spans(events, "step")
    assert len(steps) == 3
    for (name, begin, end, args), report in zip(steps, reports):
        first, last = min(t.start for t in report.tasks), max(t.end for t in report.tasks)
        assert begin == pytest.approx((first - origin) * 1e6) and end == pytest.approx((last - origin) * 1e6)
        assert name.startswith(f"step {args['step']} ")
        assert args["peak_activation_bytes"] == report.peak_activation_bytes
        inside = [e for e in complete if begin - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= end + 1e-3]
        assert len(inside) == 16
    instants = [(e["name"], e["ts"]) for e in events if e["ph"] == "i"]
    assert len(instants) == 6 and all(e["s"] == "g" for e in events if e["ph"] == "i")
    # the gaps between steps (optimizer, data loading) are visible, and nothing else is
    gaps = spans(events, "gap")
    assert len(gaps) == 2
    for (_, begin, end, args), before, after in zip(gaps, steps, steps[1:]):
        assert begin == before[2] and end == after[1]
        assert args["seconds"] >= 0.002 - 1e-9  # at least the pause between the steps
    assert [e["args"]["name"] for e in events if e.get("name") == "thread_name"] == ["steps", "rank 0", "rank 1"]


def test_timeline_command_writes_every_logged_step_or_the_one_asked_for(pipe, tmp_path, capsys):
    from pipesched.cli.main import main

    log, reports = logged_steps_of(pipe, tmp_path, 3)
    trace = tmp_path / "all.json"
    assert main(["timeline", str(log), "--chrome", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "the last of 3 logged steps" in out and "trace of 3 steps" in out
    events = json.loads(trace.read_text())["traceEvents"]
    assert len([e for e in events if e["ph"] == "X"]) == 48
    assert len(spans(events, "step")) == 3 and len(spans(events, "gap")) == 2
    # the analysis table stays the last step's: the live report's figures
    assert Timeline.from_report(reports[-1]).analyze().format_table() in out

    first = json.loads(log.read_text().splitlines()[0])["step"]
    one = tmp_path / "one.json"
    assert main(["timeline", str(log), "--step", str(first), "--chrome", str(one)]) == 0
    out = capsys.readouterr().out
    assert Timeline.from_report(reports[0]).analyze().format_table() in out
    events = json.loads(one.read_text())["traceEvents"]
    assert sorted(e["name"] for e in events if e["ph"] == "X") == sorted(
        f"{t.kind}{t.stage}.{t.microbatch}" for t in reports[0].tasks)
    assert [name for name, *_ in spans(events, "step")] == [f"step {first} ({seconds(reports[0].makespan)})"]
    assert spans(events, "gap") == []


def test_timeline_command_what_if_is_labelled_a_prediction(pipe, tmp_path, capsys):
    from pipesched.cli.main import main

    log, _ = logged_steps_of(pipe, tmp_path, 1)
    assert main(["timeline", str(log), "--what-if", "gpipe"]) == 0
    out = capsys.readouterr().out
    assert "what-if gpipe" in out and "PREDICTED" in out
    assert main(["timeline", str(log), "--what-if", "gpipe", "--json"]) == 0
    analysis = json.loads(capsys.readouterr().out)
    assert analysis["what_if"] == "gpipe" and analysis["predicted_makespan"] > 0
    assert analysis["runtime_efficiency"] <= 1.0 + 1e-9


# ------------------------------------------------------------------- Gantt chart


def interleaved_timeline():
    from pipesched import get_schedule

    plan = get_schedule("interleaved-1f1b").plan(4, 8, 2)  # rank 0: stages 0, 2; rank 1: stages 1, 3
    costs = {("F", s): 1.0 for s in range(4)} | {("B", s): 2.0 for s in range(4)}
    costs[("F", 3)] = 0.05  # a sliver: too narrow for any label
    return Timeline(simulate(plan, costs).records(), schedule="interleaved-1f1b")


def test_each_stage_of_a_rank_gets_its_own_shade():
    from pipesched.observe.export import COLORS, shade, stage_shades

    shades = stage_shades(interleaved_timeline().tasks)
    assert shades[0] == shades[1] == 0.0 and shades[2] == shades[3] > 0.0  # a rank's first stage, then lighter
    assert len({shade(COLORS["F"], shades[s]) for s in (0, 2)}) == 2
    assert stage_shades(Timeline(synthetic()).tasks) == {0: 0.0, 1: 0.0}  # one stage per rank: plain colours


def test_bar_labels_shrink_to_fit_the_bar():
    from pipesched.observe.export import bar_label

    task = TaskRecord(0, 12, 7, "F", 0.0, 1.0)
    assert bar_label(task, 200.0) == "F12.7"
    assert bar_label(task, 20.0) == "7"
    assert bar_label(task, 4.0) == ""


def test_gantt_chart_shades_stages_and_every_label_fits_its_bar():
    """The bug: every stage of a rank had one colour, and labels were all-or-nothing."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import Rectangle

    from pipesched.observe.export import gantt_figure

    timeline = interleaved_timeline()
    figure = gantt_figure(timeline)
    renderer = FigureCanvasAgg(figure).get_renderer()
    axes = figure.axes[0]
    bars = [p for p in axes.patches if isinstance(p, Rectangle)]
    assert len(bars) == len(timeline.tasks)
    by_task = dict(zip(timeline.tasks, bars))  # drawn in task order
    colour = {(t.kind, t.stage): bar.get_facecolor() for t, bar in by_task.items()}
    assert colour[("F", 0)] != colour[("F", 2)] and colour[("B", 1)] != colour[("B", 3)]
    origin = timeline.tasks[0].start  # the makespan is over 1 s: the axis is in seconds
    at = {text.get_position(): text for text in axes.texts}
    shown = {}
    for task, bar in by_task.items():
        text = at.get((task.start - origin + (task.end - task.start) / 2, task.rank))
        if text is not None:
            shown[task] = text.get_text()
            assert text.get_window_extent(renderer).width <= bar.get_window_extent(renderer).width, text.get_text()
    assert "B0.0" in shown.values() and "B1.0" in shown.values()  # long bars: the full name
    assert any(label.isdigit() for label in shown.values())  # narrower: the micro-batch alone
    assert not any(t.kind == "F" and t.stage == 3 for t in shown)  # slivers: nothing
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert "stages 0, 1" in legend and "stages 2, 3" in legend
