#!/usr/bin/env python3
"""Install pipesched and what it needs into the running Python, without surprise downloads.

    python scripts/bootstrap.py           # torch (if missing), anyio, structlog, pipesched
    python scripts/bootstrap.py --test    # ... plus pytest, pytest-asyncio, hypothesis, transformers,
                                          #     and the docs tools (mkdocs-material, mkdocstrings)
    python scripts/bootstrap.py --plot    # ... plus matplotlib (Gantt charts)

Why a script and not just ``pip install -e .``: pip resolves a bare ``torch``
requirement to the newest release, which on Linux is the CUDA build with
several GB of CUDA wheels, even on a machine without a GPU. So:

* torch already importable: kept as it is (pip sees the requirement met).
* no torch, no NVIDIA driver: the CPU build ``torch==2.13.0+cpu``; pip takes
  it from a local wheel folder or configured index when one has it, else from
  PyTorch's CPU index.
* no torch, NVIDIA driver present: the default ``torch`` (CUDA build).
* ``PIPESCHED_TORCH`` set: that requirement, verbatim (e.g. ``torch==2.5.1``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_TORCH = "torch==2.13.0+cpu"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pip(*args: str) -> int:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(command), flush=True)
    return subprocess.call(command)


def ensure_torch() -> None:
    if importlib.util.find_spec("torch") is not None:
        return
    wanted = os.environ.get("PIPESCHED_TORCH")
    if wanted:
        if pip(wanted):
            sys.exit(f"bootstrap: could not install PIPESCHED_TORCH={wanted!r}")
        return
    if shutil.which("nvidia-smi"):
        if pip("torch"):
            sys.exit("bootstrap: could not install torch")
        return
    if pip(CPU_TORCH) and pip(CPU_TORCH, "--extra-index-url", CPU_INDEX):
        sys.exit(
            f"bootstrap: could not install {CPU_TORCH}; set PIPESCHED_TORCH to a torch "
            f"requirement your package index has"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", action="store_true", help="also install the test and documentation dependencies")
    parser.add_argument("--plot", action="store_true", help="also install matplotlib for Gantt charts")
    args = parser.parse_args()
    if sys.version_info < (3, 10):
        sys.exit(f"bootstrap: pipesched needs Python >= 3.10, this is {sys.version.split()[0]}")
    ensure_torch()
    # --test also installs the docs extra: tests/test_docs.py builds the site with mkdocs --strict
    extras = [name for name, wanted in (("test", args.test), ("docs", args.test), ("plot", args.plot)) if wanted]
    target = f"{ROOT}[{','.join(extras)}]" if extras else str(ROOT)
    if pip("--quiet", "-e", target):
        sys.exit("bootstrap: installing pipesched failed")


if __name__ == "__main__":
    main()
