"""Smoke test of the benchmark suite: every benchmark at its tiniest, one round, no timing asserted.

Each run must print its table and write ``<out>/<name>.json`` holding the
common keys and its own. The distributed benchmarks spawn 2 gloo
processes on 127.0.0.1 (a few seconds each; hf_pipelining's import transformers).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.config import RunConfig
from benchmarks.suite import BENCHMARKS, main, run_one

COMMON = {"benchmark", "machine", "title", "table", "targets", "level", "seconds"}
SPECIFIC = {
    "orchestration": {"calibration", "rows", "engine_floor"},
    "pipeline1": {"workload", "rounds", "naive_over_pipeline", "naive_over_pipeline_checkpointed",
                  "recompute_speed_ratio"},
    "cpu_speedup": {"workload", "balance", "threads_seen", "rows"},
    "torch_pipelining": {"workload", "balance", "ratio_pipesched_over_peer", "contenders", "gradients", "rounds"},
    "ddp": {"workload", "ratio_pipesched_over_ddp", "winner", "contenders", "gradients", "rounds"},
    "memory": {"part_a", "part_b"},
    "real_memory": {"workload", "rows"},
    "recompute": {"workload", "calibration", "rounds", "rows", "gradients"},
    "split_backward": {"workload", "rounds", "rows"},
    "zero_bubble": {"workload", "calibration", "rows", "gradients"},
    "cpu_pays": {"workload", "cores", "balance", "rows", "threads_seen", "best_pipeline", "memory"},
    "auto": {"workload", "rows"},
    "tune": {"workload", "rows", "chosen_over_best"},
    "plan_scale": {"workload", "rows", "others", "auto"},
    "distributed": {"per_m", "baseline_src"},
    "hf_pipelining": {"workload", "per_m", "gradients", "tied_weight", "build_seconds"},
}
TABLE_MARKS = {
    "orchestration": "replay/measured",
    "pipeline1": "naive-1",
    "cpu_speedup": "ideal 2m/(m+1)",
    "torch_pipelining": "torch.distributed.pipelining",
    "ddp": "DistributedDataParallel",
    "memory": "measured/theory",
    "real_memory": "real/meter",
    "recompute": "recompute-first/never",
    "split_backward": "(B+W)/full",
    "zero_bubble": "predicted/1F1B",
    "cpu_pays": "speed vs plain",
    "auto": "auto makespan / best built-in's",
    "tune": "|pred-meas|/meas",
    "plan_scale": "µs/task",
    "distributed": "torch.distributed.pipelining",
    "hf_pipelining": "pipesched / torch step time",
}


def test_every_benchmark_is_covered():
    assert set(SPECIFIC) == set(BENCHMARKS)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_tiny_run(name, tmp_path, capsys):
    if name == "hf_pipelining":
        pytest.importorskip("transformers")
    cfg = RunConfig(level="tiny", out_dir=tmp_path, rounds=1, verbose=False)
    run_one(name, cfg)
    printed = capsys.readouterr().out
    assert TABLE_MARKS[name] in printed
    document = json.loads((tmp_path / f"{name}.json").read_text())
    missing = (COMMON | SPECIFIC[name]) - set(document)
    assert not missing, f"{name}.json lacks {sorted(missing)}"
    assert document["level"] == "tiny"
    for target in document["targets"]:
        assert target["verdict"] in ("PASS", "MISS")
        assert {"name", "figure", "threshold"} <= set(target)
    if "gradients" in document:  # the distributed peers' gradients equal the un-pipelined model's
        for pair, diff in document["gradients"].items():
            assert float(diff["relative"]) <= 1e-4, (pair, diff)
    if name == "recompute":  # checkpointing changes when the forward runs, not what the gradients are
        assert all(row["gradients_equal"] for row in document["rows"]), document["gradients"]
    if name == "split_backward":  # B then W gives the full backward's gradients, bit for bit
        assert all(row["equal"] for row in document["rows"]), document["rows"]
    assert not [t for t in threading.enumerate() if t.name.startswith("pipesched-")], "pipeline threads left running"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("ranks, microbatches", [(2, 4), (4, 8), (4, 16)])
def test_recompute_first_replay_matches_the_closed_form(schedule, ranks, microbatches):
    """Forward 1, backward 2, every backward recomputing before its wait: only the drain hides its recompute.

    The last rank's m recomputes stay on the critical path (it has no
    gradient to wait for); the p - 1 backwards of the drain wait for their
    gradient and recompute meanwhile: (m + p - 1) + 3m + 2(p - 1).
    """
    from benchmarks.bench_recompute import recompute_first_makespan
    from pipesched import get_schedule, simulate

    p, m = ranks, microbatches
    plan = get_schedule(schedule).plan(p, m, p)
    assert recompute_first_makespan(plan, p, 1.0, 2.0) == (m + p - 1) + 3 * m + 2 * (p - 1)
    on_path = simulate(plan, lambda kind, stage: 1.0 if kind == "F" else 3.0).makespan
    assert on_path == (m + p - 1) * 4


def test_command_line(tmp_path, capsys):
    assert main(["--list"]) == 0
    assert "memory" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--only", "no-such-benchmark"])
    assert main(["--tiny", "--only", "memory,pipeline1", "--out", str(tmp_path), "--rounds", "1"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"memory.json", "pipeline1.json"}
    assert "summary (tiny" in capsys.readouterr().out


def test_profile_flag_writes_a_torch_profiler_trace_of_every_thread(tmp_path, capsys):
    """``--profile DIR``: the benchmark runs under torch.profiler and its trace holds the workers' ops."""
    traces = tmp_path / "traces"
    assert main(["--tiny", "--only", "pipeline1", "--out", str(tmp_path), "--rounds", "1",
                 "--profile", str(traces)]) == 0
    assert "include torch.profiler's overhead" in capsys.readouterr().out
    trace = traces / "pipeline1.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("aten::")]
    # the main thread (naive-1 runs there) and the pipeline's worker thread (pipeline-1's ops)
    assert len({e["tid"] for e in ops}) >= 2
    assert json.loads((tmp_path / "pipeline1.json").read_text())["profile_trace"] == str(trace)
