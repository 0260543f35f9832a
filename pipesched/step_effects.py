"""A step's side effects apply only if the whole step succeeds: ``.grad`` and batch-norm statistics.

A pipelined step accumulates gradients one (stage, micro-batch) at a time, so
a step that fails half-way would leave ``.grad`` partly accumulated: neither
the old value nor old + this step's. Users expect a failed step to change
nothing, so the step first sets the existing gradients aside (a pointer swap,
no copy), accumulates into fresh ones, and on success adds the old ones back
(``old += new``, one add per parameter, the same single add an un-pipelined
``loss.backward()`` performs). On failure the fresh, partial gradients are
dropped and the old ones put back.

Deferred batch norms (:mod:`pipesched.batchnorm`) follow the same rule: what
they accumulated during the step is applied on success and discarded on
failure. The single- and multi-process pipelines both go through this class.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from pipesched.batchnorm import DeferredBatchNorm


class StepEffects:
    """Holds a step's gradients and statistics until :meth:`commit` or :meth:`rollback`.

    ``parameters``: those the step accumulates gradients into (none for a
    forward-only call). ``norms``: the deferred batch norms the step feeds.
    """

    def __init__(self, parameters: Iterable[Tensor], norms: Sequence[DeferredBatchNorm] = ()):
        self._saved = [(p, p.grad) for p in parameters if p.requires_grad]
        self._norms = norms
        for param, _ in self._saved:
            param.grad = None

    def commit(self, statistics: bool = True) -> None:
        """The step succeeded: ``.grad = old + this step's``, and, with ``statistics``
        (the step ran every forward of the batch), batch norms apply their update."""
        with torch.no_grad():
            for param, old in self._saved:
                if old is None:
                    continue
                if param.grad is None:
                    param.grad = old
                else:
                    param.grad = old.add_(param.grad)
        if statistics:
            for norm in self._norms:
                norm.commit()

    def rollback(self) -> None:
        """The step failed: every ``.grad`` is exactly what it was before, statistics untouched."""
        for param, old in self._saved:
            param.grad = old
        for norm in self._norms:
            norm.discard()
