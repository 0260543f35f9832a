"""Batch norm whose running statistics see the whole batch, not each micro-batch.

A plain ``nn.BatchNorm`` in a pipeline updates its running mean and variance
once per *micro-batch*, from that micro-batch alone: after one step the
statistics have moved ``chunks`` times, by the wrong amounts.

``DeferredBatchNorm`` normalises each micro-batch with its own statistics in
training (as batch norm must, having nothing else), but only *accumulates*
the per-channel count, mean and sum of squared deviations (Chan's parallel
formula, in float64). The pipeline calls :meth:`DeferredBatchNorm.commit`
once per successful step, which applies PyTorch's update with the statistics
of the whole batch: the same running mean, unbiased running variance and one
``num_batches_tracked`` increment as the un-pipelined model, whatever the
number of micro-batches. Recomputation (:func:`pipesched.is_recomputing`)
never accumulates, and a failed step discards what it accumulated.

What it cannot do: a batch norm *behind* another one receives inputs that
were normalised per micro-batch upstream (there is no full batch to normalise
with while the pipeline is still filling), so its inputs, and therefore its
statistics, differ from the un-pipelined model's. Its update still uses the
full-batch statistics of exactly the inputs it received, once per step. The
first batch norm of a model sees the same inputs as the plain model and ends
with the same statistics.

Used on its own, outside any pipeline, a ``DeferredBatchNorm(..., chunks=n)``
behaves as torchgpipe's: it accumulates ``n`` training forwards and then
applies one update from all of them, so a batch fed as ``n`` micro-batches
moves the statistics once, by the whole batch's. (Inside a pipeline the step
decides, whatever ``chunks`` says: it knows how many micro-batches a batch
really had, which can be fewer than ``chunks`` for a small batch.) The
variance is the unbiased one, as ``nn.BatchNorm`` keeps; torchgpipe's was
biased.

Each micro-batch still needs more than one value per channel in training
(PyTorch's batch-norm rule), so keep micro-batches of at least two rows for
``BatchNorm1d`` on 2-D inputs.

Converting keeps the module objects: :meth:`DeferredBatchNorm.convert` changes
the class of each batch norm in place to one that is both a
``DeferredBatchNorm`` and its original class. Its weight and bias stay the
very ``Parameter`` objects an optimizer built earlier holds, its hooks stay
registered, and ``isinstance(m, nn.BatchNorm2d)`` stays true for code that
picks batch norms out (weight-decay groups, freezing).

Plain (unconverted) norms have the opposite problem under checkpointing: the
recompute of a checkpointed forward would move their running statistics a
second time. :func:`frozen_running_stats` keeps a recompute from touching them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pipesched.runtime.checkpoint import is_recomputing
from pipesched.runtime.rng import declare_quiet
from pipesched.runtime.worker import on_worker_thread

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


class Moments:
    """Per-channel count, mean and sum of squared deviations, merged by Chan's formula in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, input: Tensor) -> None:
        dims = [0, *range(2, input.dim())]
        count = input.numel() // input.shape[1]
        var, mean = torch.var_mean(input.double(), dim=dims, correction=0)
        m2 = var * count
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        assert self.mean is not None and self.m2 is not None
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * count / total)
        self.count = total


class DeferredBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``nn.BatchNorm1d/2d/3d`` (any input rank ≥ 2) with deferred statistics.

    Inside a pipeline (a forward on a pipeline's worker thread), what a step
    accumulates is applied once when the step succeeds. Used on its own
    (torchgpipe's semantics), it applies one update every ``chunks`` training
    forwards, from all of them together: feed it a batch as ``chunks``
    micro-batches and its statistics are the whole batch's. The two never
    mix: a pipeline step neither applies nor drops what standalone calls
    accumulated.
    """

    def __init__(self, num_features: int, *, chunks: int = 1, **kwargs: object):
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.chunks = _check_chunks(chunks)
        self._reset_accumulators()

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"DeferredBatchNorm expects at least 2-D input, got {input.dim()}-D")

    def _reset_accumulators(self) -> None:
        self._step = Moments()  # a pipeline step's forwards
        self._standalone = Moments()  # forwards outside any pipeline, applied every `chunks` calls
        self._tracked = 0

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(input)
        self._check_input_dim(input)
        if not is_recomputing():
            if on_worker_thread():
                self._step.add(input.detach())
            else:
                self._standalone.add(input.detach())
                self._tracked += 1
                if self._tracked >= self.chunks:
                    self._update_running(self._standalone)
                    self._standalone, self._tracked = Moments(), 0
        return nn.functional.batch_norm(
            input, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps
        )

    @torch.no_grad()
    def _update_running(self, moments: Moments) -> None:
        """One running-statistics update, as PyTorch's, from ``moments`` (unbiased variance)."""
        if moments.count == 0:
            return
        assert moments.mean is not None and moments.m2 is not None
        self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
        else:
            factor = self.momentum
        unbiased = moments.m2 / max(moments.count - 1, 1)
        self.running_mean.mul_(1 - factor).add_(moments.mean.to(self.running_mean.dtype), alpha=factor)  # type: ignore[union-attr]
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)  # type: ignore[union-attr]

    def commit(self) -> None:
        """Apply one running-statistics update from everything the pipeline step accumulated, then forget it."""
        self._update_running(self._step)
        self._step = Moments()

    def discard(self) -> None:
        """Forget what a failed pipeline step accumulated."""
        self._step = Moments()

    @classmethod
    def convert(cls, module: nn.Module, chunks: int | None = None) -> nn.Module:
        """Make every ``nn.BatchNorm1d/2d/3d`` in ``module`` that tracks running statistics
        (in place) a ``DeferredBatchNorm``.

        Each batch norm keeps its identity: only its class changes, to a
        subclass of both ``cls`` and its original class (``nn.BatchNorm2d``
        becomes :class:`DeferredBatchNorm2d`). So parameters, buffers, hooks
        and the optimizer's references survive, and ``isinstance`` checks
        against the original class still hold. ``chunks``: forwards per
        standalone update (default: keep a converted norm's, else 1). A norm
        with ``track_running_stats=False`` has nothing to defer and stays as
        it is. Returns ``module``.

        One exception, torchgpipe's: ``module`` itself a ``DeferredBatchNorm``
        asked for another ``chunks`` is left as it is and a new norm comes
        back (:meth:`with_chunks`), so ``convert(norm, chunks=k)`` never
        changes the cadence of a norm the caller still uses.
        """
        if chunks is not None:
            chunks = _check_chunks(chunks)
        if isinstance(module, cls) and chunks is not None and chunks != module.chunks:
            return module.with_chunks(chunks)
        for child in module.modules():
            if isinstance(child, cls):
                if chunks is not None:
                    child.chunks = chunks
            elif isinstance(child, _BATCH_NORMS) and child.track_running_stats:
                child.__class__ = _deferred_class(cls, type(child))
                child.chunks = 1 if chunks is None else chunks
                child._reset_accumulators()
        return module

    def with_chunks(self, chunks: int) -> DeferredBatchNorm:
        """A new norm of this class with its own ``chunks`` and nothing accumulated yet.

        It shares this norm's parameters and running-statistics buffers (the
        same tensors, as torchgpipe's conversion shares them), so an optimizer
        built on this norm trains it too; its hooks are this norm's at the
        time of the call. Its module containers are its own: registering on
        one later does not touch the other.
        """
        chunks = _check_chunks(chunks)
        twin = copy.copy(self)  # same class (a converted norm's made-up class too) and attributes
        for name, value in vars(self).items():  # _parameters, _buffers, hooks, ...: containers of its own
            if isinstance(value, (dict, set, list)):
                twin.__dict__[name] = copy.copy(value)
        twin.chunks = chunks
        twin._reset_accumulators()
        return twin

    @classmethod
    def convert_deferred_batch_norm(cls, module: nn.Module, chunks: int = 1) -> nn.Module:
        """torchgpipe's spelling of :meth:`convert` (in place here; returns ``module``, or a new norm
        when ``module`` is a ``DeferredBatchNorm`` asked for another ``chunks``)."""
        return cls.convert(module, chunks)


def _check_chunks(chunks: object) -> int:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(
            f"chunks = {chunks!r}: DeferredBatchNorm needs the number of micro-batches per batch, an int >= 1"
        )
    return chunks


@declare_quiet  # its forward draws nothing; a user subclass converted gets a class of its own, watched
class DeferredBatchNorm1d(DeferredBatchNorm, nn.BatchNorm1d):
    """An ``nn.BatchNorm1d`` converted by :meth:`DeferredBatchNorm.convert`."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


@declare_quiet
class DeferredBatchNorm2d(DeferredBatchNorm, nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` converted by :meth:`DeferredBatchNorm.convert`."""

    _check_input_dim = nn.BatchNorm2d._check_input_dim


@declare_quiet
class DeferredBatchNorm3d(DeferredBatchNorm, nn.BatchNorm3d):
    """An ``nn.BatchNorm3d`` converted by :meth:`DeferredBatchNorm.convert`."""

    _check_input_dim = nn.BatchNorm3d._check_input_dim


_CONVERTED: dict[tuple[type, type], type] = {
    (DeferredBatchNorm, nn.BatchNorm1d): DeferredBatchNorm1d,
    (DeferredBatchNorm, nn.BatchNorm2d): DeferredBatchNorm2d,
    (DeferredBatchNorm, nn.BatchNorm3d): DeferredBatchNorm3d,
}


def _deferred_class(deferred: type, original: type) -> type:
    """The class a converted ``original`` batch norm takes: ``deferred`` first, then ``original``.

    ``deferred``'s ``forward`` wins; the original's input check is kept, so a
    converted layer accepts exactly what it accepted before. Subclasses of
    the torch classes (and of ``DeferredBatchNorm``) get a class made once.
    """
    key = (deferred, original)
    if key not in _CONVERTED:
        _CONVERTED[key] = type(
            f"Deferred{original.__name__}",
            (deferred, original),
            {"_check_input_dim": original._check_input_dim, "__module__": __name__,
             "__doc__": f"A {original.__name__} converted by DeferredBatchNorm.convert."},
        )
    return _CONVERTED[key]


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module | None) -> Iterator[None]:
    """Leave the running statistics of every norm in ``module`` exactly as the block found them.

    A checkpointed forward runs twice, and a plain batch norm in training
    mode updates ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` on each run: the recompute would apply the
    update a second time. Inside the block, every training-mode norm of
    ``torch.nn`` that tracks running statistics (``nn.BatchNorm*``,
    ``SyncBatchNorm``, ``nn.InstanceNorm*`` with ``track_running_stats``, and
    subclasses) updates throw-away copies of those buffers instead of its own;
    its own tensors are put back on exit. Copies, not an in-place restore:
    autograd saved the buffers for the backward, and rewriting them in place
    would invalidate that graph. ``DeferredBatchNorm`` needs none of this (it
    does not accumulate while recomputing). ``None`` does nothing.
    """
    swapped: list[tuple[nn.Module, dict[str, Tensor]]] = []
    for norm in () if module is None else module.modules():
        if (isinstance(norm, nn.modules.batchnorm._NormBase) and not isinstance(norm, DeferredBatchNorm)
                and norm.training and norm.track_running_stats):
            own = {name: norm._buffers[name] for name in _RUNNING_STATS if norm._buffers.get(name) is not None}
            swapped.append((norm, own))  # type: ignore[arg-type]
            for name, buffer in own.items():
                norm._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for norm, own in swapped:
            norm._buffers.update(own)


def convert_deferred_batch_norm(module: nn.Module, chunks: int | None = None) -> nn.Module:
    """Make every batch norm in ``module`` a :class:`DeferredBatchNorm`, in place, keeping the objects.

    ``chunks``: forwards per update when a norm is used outside a pipeline
    (see :class:`DeferredBatchNorm`); ``None`` keeps a converted norm's, else 1.
    A ``DeferredBatchNorm`` passed itself with another ``chunks`` comes back as
    a new norm sharing its parameters and statistics (torchgpipe's behaviour).
    """
    return DeferredBatchNorm.convert(module, chunks)
