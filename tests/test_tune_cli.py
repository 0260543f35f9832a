"""``pipesched tune``: the ranked table and the winning Pipeline line, JSON, and one-line errors."""

from __future__ import annotations

import json

from pipesched.cli.main import main


def test_tune_prints_the_table_and_the_winning_pipeline(capsys):
    status = main(["tune", "--batch", "8", "--chunks", "2,4", "--schedules", "gpipe,1f1b", "--checkpoint", "never",
                   "--repeat", "1", "--memory", "64MiB", "--quiet", "--measure", "0"])
    out = capsys.readouterr().out
    assert status == 0
    assert "memory budget 64.0 MiB per rank" in out and "\nbest: " in out
    assert out.count(" never ") == 6  # 2 schedules x 2 chunk counts, and no pipeline at 2 and 4 micro-batches
    assert out.count("none (no pipeline)") == 2


def test_tune_measures_its_top_3_by_default_and_can_leave_out_not_pipelining(capsys):
    status = main(["tune", "--batch", "4", "--chunks", "2", "--schedules", "gpipe,1f1b", "--checkpoint", "never",
                   "--repeat", "1", "--quiet", "--pipelined-only", "--json"])
    assert status == 0
    document = json.loads(capsys.readouterr().out)
    assert all(c["schedule"] != "none" for c in document["candidates"])
    assert sum(c["measured_step_s"] is not None for c in document["candidates"]) == 2  # all there are


def test_tune_json(capsys):
    assert main(["tune", "--batch", "4", "--chunks", "2", "--schedules", "1f1b", "--checkpoint", "always",
                 "--repeat", "1", "--quiet", "--json", "--pipelined-only", "--measure", "0"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["best"]["schedule"] == "1f1b" and document["pipeline"].startswith("Pipeline(")


def test_tune_errors_are_one_line(capsys):
    assert main(["tune", "--batch", "4", "--chunks", "2", "--schedules", "1f1b", "--memory", "1KiB",
                 "--repeat", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipesched tune: error: no candidate fits memory_budget") and err.count("\n") == 1
