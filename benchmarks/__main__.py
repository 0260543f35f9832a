"""``python -m benchmarks [--quick] [--only NAME] [--out DIR]``: run the suite."""

import sys

from benchmarks.suite import main

sys.exit(main())
