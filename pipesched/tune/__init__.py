"""Cost-driven planning: profile a model, balance it exactly, pick a schedule under a memory budget.

* :func:`pipesched.profile` (:mod:`~pipesched.tune.measure`): per-layer F, B, W time and bytes;
  :class:`~pipesched.tune.costs.Profile` (JSON round trip).
* :mod:`pipesched.balance` (:mod:`~pipesched.tune.balance`): ``balance_by_time`` / ``balance_by_size``.
* :func:`pipesched.tune` (:mod:`~pipesched.tune.search`): schedule × chunks × checkpoint × balance,
  predicted by the simulator (:mod:`~pipesched.tune.predict`), optionally measured.

This package sits above the pipelines and below the CLI. ``pipesched.tune``
names both this package and the function, and Python binds whichever is
imported last to the attribute; so the package object is callable too:
``pipesched.tune(...)`` runs :func:`~pipesched.tune.search.tune` either way.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

from pipesched.tune.costs import LayerProfile, Profile, StageCost
from pipesched.tune.measure import profile
from pipesched.tune.search import Candidate, TuneResult, tune

__all__ = ["Candidate", "LayerProfile", "Profile", "StageCost", "TuneResult", "profile", "tune"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return tune(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """``inspect.signature(pipesched.tune)`` and ``help`` show the function's arguments."""
        return inspect.signature(tune)


sys.modules[__name__].__class__ = _CallableModule
