"""Keep a failed step from touching ``.grad``.

A pipelined step accumulates gradients one (stage, micro-batch) at a time, so
a step that fails half-way would leave ``.grad`` partly accumulated: neither
the old value nor old + this step's. Users expect a failed step to change
nothing, so the step first sets the existing gradients aside (a pointer swap,
no copy), accumulates into fresh ones, and on success adds the old ones back
(``old += new``, one add per parameter, the same single add an un-pipelined
``loss.backward()`` performs). On failure the fresh, partial gradients are
dropped and the old ones put back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class GradientStash:
    def __init__(self, parameters: Iterable[Tensor]):
        self._saved = [(p, p.grad) for p in parameters if p.requires_grad]
        for param, _ in self._saved:
            param.grad = None

    def commit(self) -> None:
        """The step succeeded: ``.grad = old + this step's`` (old kept where nothing new came)."""
        with torch.no_grad():
            for param, old in self._saved:
                if old is None:
                    continue
                if param.grad is None:
                    param.grad = old
                else:
                    param.grad = old.add_(param.grad)

    def rollback(self) -> None:
        """The step failed: every ``.grad`` is exactly what it was before the step."""
        for param, old in self._saved:
            param.grad = old
