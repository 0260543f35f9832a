"""torchgpipe's import path: ``from pipesched.balance import balance_by_time, balance_by_size``.

The code lives in :mod:`pipesched.tune.balance`.
"""

from pipesched.tune.balance import balance_by_size, balance_by_time, balance_cost

__all__ = ["balance_by_size", "balance_by_time", "balance_cost"]
