"""Batch norm whose running statistics see the whole batch, not each micro-batch.

A plain ``nn.BatchNorm`` in a pipeline updates its running mean and variance
once per *micro-batch*, from that micro-batch alone: after one step the
statistics have moved ``chunks`` times, by the wrong amounts, and a
checkpointed micro-batch moves them once more while recomputing.

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

Each micro-batch still needs more than one value per channel in training
(PyTorch's batch-norm rule), so keep micro-batches of at least two rows for
``BatchNorm1d`` on 2-D inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipesched.checkpoint import is_recomputing

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class DeferredBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``nn.BatchNorm1d/2d/3d`` (any input rank ≥ 2) with deferred statistics."""

    def __init__(self, num_features: int, **kwargs: object):
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self._reset_accumulators()

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"DeferredBatchNorm expects at least 2-D input, got {input.dim()}-D")

    def _reset_accumulators(self) -> None:
        self._count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(input)
        self._check_input_dim(input)
        if not is_recomputing():
            self._accumulate(input.detach())
        return nn.functional.batch_norm(
            input, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps
        )

    def _accumulate(self, input: Tensor) -> None:
        dims = [0, *range(2, input.dim())]
        count = input.numel() // input.shape[1]
        var, mean = torch.var_mean(input.double(), dim=dims, correction=0)
        m2 = var * count
        if self._count == 0:
            self._count, self._mean, self._m2 = count, mean, m2
            return
        total = self._count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + delta.pow(2) * (self._count * count / total)
        self._count = total

    @torch.no_grad()
    def commit(self) -> None:
        """Apply one running-statistics update from everything accumulated, then forget it."""
        if self._count == 0:
            return
        assert self._mean is not None and self._m2 is not None
        self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
        else:
            factor = self.momentum
        unbiased = self._m2 / max(self._count - 1, 1)
        self.running_mean.mul_(1 - factor).add_(self._mean.to(self.running_mean.dtype), alpha=factor)  # type: ignore[union-attr]
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)  # type: ignore[union-attr]
        self._reset_accumulators()

    def discard(self) -> None:
        """Forget what a failed step accumulated."""
        self._reset_accumulators()

    @classmethod
    def convert(cls, module: nn.Module, _memo: dict[int, nn.Module] | None = None) -> nn.Module:
        """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` (in place) by a ``DeferredBatchNorm``.

        Parameters and buffers are moved over; returns ``module`` (or the
        replacement, if ``module`` itself is a batch norm). The replacement is
        a new module object: register hooks on batch norms after converting.
        A batch norm used at several places gets one replacement used at all of them.
        """
        memo = {} if _memo is None else _memo
        if id(module) in memo:
            return memo[id(module)]
        if isinstance(module, _BATCH_NORMS) and not isinstance(module, cls):
            like = module.weight if module.affine else module.running_mean
            replacement = cls(
                module.num_features,
                eps=module.eps,
                momentum=module.momentum,
                affine=module.affine,
                track_running_stats=module.track_running_stats,
                **({} if like is None else {"device": like.device, "dtype": like.dtype}),
            )
            replacement.load_state_dict(module.state_dict())
            replacement.train(module.training)
            memo[id(module)] = replacement
            return replacement
        memo[id(module)] = module
        # every position, even of a repeated child (named_children() lists it once)
        for name, child in list(module._modules.items()):
            converted = child if child is None else cls.convert(child, memo)
            if converted is not child:
                setattr(module, name, converted)
        return module


def convert_deferred_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every batch norm in ``module`` by :class:`DeferredBatchNorm`, in place."""
    return DeferredBatchNorm.convert(module)
