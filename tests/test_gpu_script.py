"""The device check script (``python -m benchmarks.gpu``) runs end to end on the CPU, and fails loudly.

Device time is scarce, so the script the GPU session will run is exercised
here at tiny sizes (``--cpu-dry-run``) with a small budget: every item must
report at least one measured row, no item may raise, and the JSON and the
Markdown table must be there. A second run corrupts one gradient on purpose
and must return 1 with the mismatch recorded: a wrong gradient can't pass
silently. Nothing here is timed; the budget only bounds how much runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ITEMS = ("gradients", "resnet", "memory", "orchestration", "any_model")


def dry_run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(out), "--cpu-dry-run", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_cpu_dry_run_measures_every_item_and_writes_json_and_markdown(tmp_path):
    done = dry_run(tmp_path, "--budget-s", "10", "--grace-s", "200")  # a slow CI machine is no failure
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "gpu.md"]  # the device returns <= 8 files
    document = json.loads((tmp_path / "gpu.json").read_text())
    assert document["meta"]["dry_run"] is True and document["failures"] == [] and document["errors"] == []
    assert list(document["items"]) == list(ITEMS)
    for name, item in document["items"].items():
        assert item["status"] == "done", (name, item["errors"])
        assert item["rows"], f"{name} measured nothing: {item['skipped']}"
    assert all(row["ok"] for row in document["items"]["gradients"]["rows"])
    experiments = {row["experiment"] for row in document["items"]["resnet"]["rows"]}
    assert {"naive-1", "pipeline-1"} <= experiments
    markdown = (tmp_path / "gpu.md").read_text()
    assert "no wrong gradients" in markdown
    assert all(row["ok"] for row in document["items"]["any_model"]["rows"])
    for title in ("## 2. Gradients", "## 3. ResNet-101", "## 4. AmoebaNet-D", "## 5. Orchestration", "## 6. Any model"):
        assert title in markdown


def test_a_wrong_gradient_fails_the_run_and_is_recorded(tmp_path, capsys):
    """In-process (one interpreter start less): ``main`` returns 1 and the files say FAILED."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.gpu.__main__ import main

    threads = torch.get_num_threads()
    try:
        status = main(["--out", str(tmp_path), "--cpu-dry-run", "--only", "gradients", "--budget-s", "1",
                       "--grace-s", "200", "--corrupt-gradient"])
    finally:
        torch.set_num_threads(threads)  # the dry run takes one intra-op thread
    assert status == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "off by 1.000e+00" in err
    document = json.loads((tmp_path / "gpu.json").read_text())
    assert len(document["failures"]) == 1 and "parameter 0" in document["failures"][0]
    assert document["items"]["gradients"]["rows"][0]["ok"] is False
    assert "**FAILED** (1 wrong)" in (tmp_path / "gpu.md").read_text()
