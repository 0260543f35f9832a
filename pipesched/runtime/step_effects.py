"""A step's side effects apply only if the whole step succeeds: ``.grad`` and batch-norm statistics.

A pipelined step accumulates gradients one (stage, micro-batch) at a time, so
a step that fails half-way would leave ``.grad`` partly accumulated: neither
the old value nor old + this step's. Users expect a failed step to change
nothing, so the step first sets the existing gradients aside (a pointer swap,
no copy), accumulates into fresh ones, and on success adds the old ones back
(``old += new``, one add per parameter, the same single add an un-pipelined
``loss.backward()`` performs). On failure the fresh, partial gradients are
dropped and the old ones put back.

Deferred batch norms (:mod:`pipesched.runtime.batchnorm`) follow the same rule: what
they accumulated during the step is applied on success and discarded on
failure. The single- and multi-process pipelines both go through this class.

A step aborted by the watchdog may leave a task stuck in user code (it cannot
be interrupted). When it returns, its backward would accumulate into ``.grad``
*after* the rollback put the old gradients back, corrupting them and the next
step. :class:`GradientFence` discards those late writes until the task
returns; meanwhile no step may use the fenced parameters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from pipesched.runtime.batchnorm import DeferredBatchNorm


class StepEffects:
    """Holds a step's gradients and statistics until :meth:`commit` or :meth:`rollback`.

    ``parameters``: those the step accumulates gradients into (none for a
    forward-only call). ``norms``: the deferred batch norms the step feeds.
    """

    def __init__(self, parameters: Iterable[Tensor], norms: Sequence[DeferredBatchNorm] = ()):
        # de-duplicated: a tied parameter listed twice would get its old gradient added back twice
        unique = {id(p): p for p in parameters if p.requires_grad}
        _refuse_fenced(unique.values())
        self._saved = [(p, p.grad) for p in unique.values()]
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


_fence_lock = threading.Lock()
_fenced: dict[int, list[GradientFence]] = {}  # id(parameter) -> the fences standing on it


def _refuse_fenced(parameters: Iterable[Tensor]) -> None:
    if not _fenced:
        return
    with _fence_lock:
        task = next((_fenced[id(p)][0].task for p in parameters if id(p) in _fenced), None)
    if task is not None:
        raise RuntimeError(
            f"cannot run this step: {task} is still running from a stalled step and would write "
            f"into .grad of parameters this step uses; wait for it to return, or restart the process"
        )


class GradientFence:
    """Discards every gradient accumulated into ``parameters`` until :meth:`lift`.

    Set up for the parameters of a rank whose task was left stuck by a stalled
    step, and lifted as soon as that task returns. Each accumulation is
    diverted, not undone: a hook that runs just before autograd accumulates
    sets ``.grad`` aside (a pointer, no copy) and leaves ``None``, so autograd
    writes into a fresh tensor; a hook that runs right after puts the
    set-aside gradient back. ``.grad`` thus stays exactly what the rollback
    restored, whatever the late backward does. While the fence stands,
    :class:`StepEffects` refuses steps using these parameters, since their
    gradients would be discarded too (as would those of a backward you run
    yourself through them meanwhile).
    """

    def __init__(self, parameters: Iterable[Tensor], task: str):
        self.task = task
        self._params = list({id(p): p for p in parameters if p.requires_grad}.values())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        with _fence_lock:
            for param in self._params:
                _fenced.setdefault(id(param), []).append(self)
        for param in self._params:
            aside: list[Tensor | None] = []
            self._handles.append(param.register_hook(_set_aside_hook(param, aside)))
            self._handles.append(param.register_post_accumulate_grad_hook(_put_back_hook(aside)))

    def lift(self) -> None:
        """Accumulations reach ``.grad`` again. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        with _fence_lock:
            for param in self._params:
                fences = _fenced[id(param)]
                fences.remove(self)
                if not fences:
                    del _fenced[id(param)]
        self._params = []


def _set_aside_hook(param: Tensor, aside: list[Tensor | None]):  # type: ignore[no-untyped-def]
    def hook(grad: Tensor) -> None:
        aside.append(param.grad)
        param.grad = None

    return hook


def _put_back_hook(aside: list[Tensor | None]):  # type: ignore[no-untyped-def]
    def hook(param: Tensor) -> None:
        param.grad = aside.pop()

    return hook
