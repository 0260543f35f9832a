#!/usr/bin/env python3
"""Make this checkout importable *as installed* without building anything (the GPU check's fallback).

    python3 scripts/register_checkout.py SITE     # then: PYTHONPATH=SITE:<checkout> python3 ...

``pip install -e .`` needs setuptools (>= 64) and a wheel builder in the
running Python. Where that fails (a locked or old image), this does by hand
the two things the editable install provides, and nothing else:

* the entry points: ``SITE/pipesched-<version>.dist-info/`` with ``METADATA``
  and ``entry_points.txt`` written from ``pyproject.toml``, so
  ``importlib.metadata`` lists the built-in schedules exactly as it lists a
  third-party plug-in's; the registry is not touched;
* the package map ``pipesched.schedules`` -> ``schedules/``: a symbolic link
  ``pipesched/schedules`` -> ``../schedules`` in the checkout (git-ignored).

Undo with ``rm -r SITE/pipesched-*.dist-info pipesched/schedules``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    import tomllib  # Python >= 3.11, as on the GPU image (3.12)

    site = Path(argv[0]).resolve()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    name, version = project["name"], project["version"]
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    lines = []
    for group, points in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in points.items()]
        lines.append("")
    if project.get("scripts"):
        lines.append("[console_scripts]")
        lines += [f"{key} = {value}" for key, value in project["scripts"].items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    link = ROOT / "pipesched" / "schedules"
    if not link.exists():
        link.symlink_to(Path("..") / "schedules", target_is_directory=True)
    print(f"registered {name} {version} from {ROOT}: entry points in {info}, {link} -> ../schedules")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
