"""``python benchmarks/run_all.py [--quick] [--only NAME] [--out DIR]``: same as ``python -m benchmarks``."""

import sys
from pathlib import Path

if __name__ == "__main__":
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.suite import main

    sys.exit(main())
