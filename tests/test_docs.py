"""The documentation stays true: the site builds with ``mkdocs build --strict`` (a broken
link, a missing anchor or an API name that vanished fails), the API reference lists
``pipesched.__all__``, nothing points outside the repository, and the README stays short
and shows exactly the command CI runs. The docs' code blocks run in test_readme_examples.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import pipesched

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
# the markdown files outside docs/ that link into the repository (mkdocs checks the pages under docs/)
LINKING = [README, ROOT / "benchmarks" / "RESULTS.md", ROOT / "CHANGELOG.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", **_env()}, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "pipesched" / "index.html").is_file()


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_reference_lists_all_of_pipesched():
    text = (ROOT / "docs" / "reference" / "pipesched.md").read_text(encoding="utf-8")
    members = re.search(r"members:\n((?:\s+- \w+\n)+)", text)
    assert members, "docs/reference/pipesched.md lost its members list"
    listed = re.findall(r"- (\w+)", members.group(1))
    # pipesched.tune is documented on its own (the name is also a sub-package)
    assert sorted([*listed, "tune"]) == sorted(pipesched.__all__)
    assert "::: pipesched.tune.search.tune" in text


@pytest.mark.parametrize("path", LINKING, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        file = (path.parent / target.split("#")[0]).resolve()
        assert file.is_relative_to(ROOT), f"{path.name} links outside the repository: {target}"
        assert file.exists(), f"{path.name} links to a missing file: {target}"


def test_nothing_points_outside_the_repository():
    files = [README, *LINKING, *(ROOT / "docs").rglob("*.md"), *(ROOT / "pipesched").rglob("*.py")]
    for path in files:
        if path.exists():
            assert "shared/" not in path.read_text(encoding="utf-8"), f"{path} mentions shared/"


def test_readme_is_short_and_shows_the_ci_command():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move text into docs/"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert any(line.split("#")[0].strip() == ci for line in lines), f"README.md does not show CI's command {ci!r}"


def test_timeline_pictures_are_drawn_from_a_measured_step(tmp_path):
    """The README's pictures come from ``scripts/timeline_gantt.py``: it runs a real step per schedule
    and writes one PNG each (needs matplotlib, the ``plot`` extra)."""
    pytest.importorskip("matplotlib")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "timeline_gantt.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    for schedule in ("1f1b", "zb-h1"):
        png = tmp_path / f"timeline-{schedule}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", schedule
        assert f"timeline-{schedule}.png" in (ROOT / "README.md").read_text(encoding="utf-8")
