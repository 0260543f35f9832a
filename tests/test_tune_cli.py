"""``pipesched tune``: the ranked table and the winning Pipeline line, JSON, and one-line errors."""

from __future__ import annotations

import json

from pipesched.cli.main import main


def test_tune_prints_the_table_and_the_winning_pipeline(capsys):
    status = main(["tune", "--batch", "8", "--chunks", "2,4", "--schedules", "gpipe,1f1b", "--checkpoint", "never",
                   "--repeat", "1", "--memory", "64MiB", "--quiet"])
    out = capsys.readouterr().out
    assert status == 0
    assert "memory budget 64.0 MiB per rank" in out and "best: Pipeline(model, schedule=" in out
    assert out.count(" never ") == 4  # 2 schedules x 2 chunk counts


def test_tune_json(capsys):
    assert main(["tune", "--batch", "4", "--chunks", "2", "--schedules", "1f1b", "--checkpoint", "always",
                 "--repeat", "1", "--quiet", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["best"]["schedule"] == "1f1b" and document["pipeline"].startswith("Pipeline(")


def test_tune_errors_are_one_line(capsys):
    assert main(["tune", "--batch", "4", "--chunks", "2", "--schedules", "1f1b", "--memory", "1KiB",
                 "--repeat", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipesched tune: error: no candidate fits memory_budget") and err.count("\n") == 1
