"""How much each micro-batch's loss counts: its share of the batch's normaliser.

A mean-reduced loss is ``sum / normaliser``. Over the whole batch that is
``S / N``; over micro-batch ``m`` it is ``S_m / N_m``. Weighting micro-batch
``m`` by ``N_m / N`` makes the weighted sum exactly ``S / N``, so the
pipeline's gradients equal those of ``loss_fn(model(inputs), targets)``.

What ``N`` counts depends on the loss:

* ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` with class-index (integer)
  targets: the targets that are not ``ignore_index``, each counting
  ``weight[target]`` (1 without class weights). ``label_smoothing`` divides
  by the same sum. This is the usual language-model loss on padded batches,
  where rows hold different numbers of tokens. ``F.cross_entropy`` and
  ``F.nll_loss`` passed as they are (or as a ``functools.partial`` of
  keywords) count the same way: they are the modules' computation.
* every other mean-reduced loss (``torch.nn`` losses average over elements or
  rows; CE with probability targets too): rows.
* ``reduction="sum"``: no normaliser, every micro-batch counts 1.
* a module loss with a ``loss_normalizer(targets)`` method
  (:class:`~pipesched.runtime.causal_lm_loss.CausalLMLoss`: its kept,
  shifted tokens): that count, declared by the loss itself.
* a ``loss_normalizer(targets_of_a_microbatch) -> count`` given by the user:
  that count, whatever the loss. This is the way to declare the normaliser of
  a plain function such as ``lambda out, y: F.cross_entropy(out, y)``, which
  pipesched cannot look into.

The batch's count is the sum of its micro-batches' counts (a mean's
normaliser adds up over rows), computed where the targets are: in the caller
for :class:`~pipesched.Pipeline`, on the last stage's rank for
:class:`~pipesched.distributed.DistributedPipeline`, so no communication is
needed.

A micro-batch whose count is 0 (every token padding) has a loss of 0/0 (NaN):
it adds nothing to the loss or the gradients. A batch whose count is 0 has the
loss torch gives it, NaN, but adds no gradient at all: torch's backward would
write NaN into every ``.grad`` and the next optimizer step into every weight.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

#: ``loss_normalizer(targets_of_a_microbatch) -> count``: a number or a 0-dim tensor, >= 0.
LossNormalizer = Callable[[Any], float | int | Tensor]

_CLASS_INDEX_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


def check_loss_normalizer(loss_normalizer: object, loss_fn: Any) -> LossNormalizer | None:
    """Validate ``loss_normalizer``; warn when ``loss_fn`` needs one pipesched cannot infer.

    That is a subclass of ``CrossEntropyLoss``/``NLLLoss`` overriding
    ``forward``: its mean may be over tokens (reshaping, then
    ``super().forward``) or over rows. pipesched cannot tell, weights by rows,
    and says how to declare it.
    """
    if loss_normalizer is not None:
        if isinstance(loss_normalizer, type) or not callable(loss_normalizer):
            raise TypeError(
                f"loss_normalizer must be a callable (targets_of_a_microbatch) -> count or None, got "
                f"{loss_normalizer!r}; e.g. loss_normalizer=lambda y: (y != -100).sum()"
            )
        return loss_normalizer  # type: ignore[return-value]
    declared = getattr(loss_fn, "loss_normalizer", None)
    if isinstance(loss_fn, nn.Module) and callable(declared):
        return declared  # a module loss that declares its normaliser (pipesched.CausalLMLoss)
    if (
        isinstance(loss_fn, _CLASS_INDEX_LOSSES)
        and not _recognised(loss_fn)
        and getattr(loss_fn, "reduction", "mean") != "sum"
    ):
        base = next(c.__name__ for c in _CLASS_INDEX_LOSSES if isinstance(loss_fn, c))
        warnings.warn(
            f"loss_fn is a {type(loss_fn).__name__}, a subclass of {base} that overrides forward, so "
            f"pipesched cannot tell what its mean is over and weights micro-batches by rows. Declare "
            f"it: loss_normalizer=lambda y: (y != {loss_fn.ignore_index}).sum() for a mean over "
            f"tokens, or loss_normalizer=lambda y: y.shape[0] for rows",
            stacklevel=3,
        )
    return None


#: The targets value ``F.cross_entropy``, ``F.nll_loss`` and their modules ignore by default.
_DEFAULT_IGNORE_INDEX = -100


class PaddedTargetsCheck:
    """Warns, once per pipeline, when a loss pipesched cannot look into meets padded targets.

    A plain function (``lambda out, y: F.cross_entropy(out.flatten(0, 1),
    y.flatten())``, or a lambda or module around ``nn.CrossEntropyLoss()``)
    gets micro-batches weighted by rows, but if its mean is over the
    non-ignored tokens each micro-batch should count its tokens: on padded
    language-model batches the gradients are then badly wrong (94 % off
    seen), with nothing to tell. pipesched cannot know the function's mean
    (it may shift the targets, add a term, average over rows), so it does
    not guess: it warns when integer targets hold an ignored value (-100, or
    an ``ignore_index`` it can see: a ``functools.partial`` keyword, a
    cross-entropy/NLL module the function closes over or refers to, or that
    a module loss holds), naming ``loss_normalizer=``, which both fixes the
    weights and silences the warning.
    """

    def __init__(self, loss_fn: Any, loss_normalizer: LossNormalizer | None):
        self.ignored: tuple[int, ...] = ()
        loss_fn = as_module_loss(loss_fn)
        if loss_fn is None or loss_normalizer is not None or getattr(loss_fn, "reduction", "mean") == "sum":
            return
        if isinstance(loss_fn, _CLASS_INDEX_LOSSES) or type(loss_fn).__module__.startswith("torch.nn."):
            return  # recognised, warned about when built (a subclass), or a torch loss without ignore_index
        self.ignored = tuple(dict.fromkeys([_DEFAULT_IGNORE_INDEX, *_visible_ignore_indices(loss_fn)]))
        self.name = getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)

    def __call__(self, targets: Sequence[Tensor]) -> None:
        """Check one batch's target tensors (before splitting); after one warning, never again."""
        if not self.ignored:
            return
        for tensor in targets:
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                continue
            for value in self.ignored:
                if bool((tensor == value).any()):
                    self.ignored = ()
                    warnings.warn(
                        f"loss_fn {self.name} is a function pipesched cannot look into, and the targets hold "
                        f"{value}, a cross-entropy ignore_index: micro-batches are weighted by rows, so if "
                        f"its mean is over the non-ignored targets the loss and gradients are wrong. Declare "
                        f"it: loss_normalizer=lambda y: (y != {value}).sum() for a mean over tokens "
                        f"(count the targets it keeps, after any shift), or loss_normalizer=lambda y: "
                        f"y.shape[0] for a mean over rows",
                        stacklevel=2,
                    )
                    return


def _visible_ignore_indices(loss_fn: Any) -> list[int]:
    """The ``ignore_index`` values ``loss_fn`` shows without being called (see :class:`PaddedTargetsCheck`)."""
    found: list[Any] = []
    keywords = getattr(loss_fn, "keywords", None)  # functools.partial(F.cross_entropy, ignore_index=0)
    if isinstance(keywords, dict) and "ignore_index" in keywords:
        found.append(keywords["ignore_index"])
    if isinstance(loss_fn, nn.Module):
        found += [m.ignore_index for m in loss_fn.modules() if isinstance(m, _CLASS_INDEX_LOSSES)]
    code = getattr(loss_fn, "__code__", None)
    values = [cell.cell_contents for cell in getattr(loss_fn, "__closure__", None) or () if _filled(cell)]
    if code is not None:
        scope = getattr(loss_fn, "__globals__", {})
        values += [scope[name] for name in code.co_names if name in scope]
    found += [v.ignore_index for v in values if isinstance(v, _CLASS_INDEX_LOSSES)]
    return [int(v) for v in found if isinstance(v, int) and not isinstance(v, bool)]


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return False
    return True


#: torch's functional class-index losses, and the module each one is.
_FUNCTIONAL_LOSSES = {
    torch.nn.functional.cross_entropy: nn.CrossEntropyLoss,
    torch.nn.functional.nll_loss: nn.NLLLoss,
}
_FUNCTIONAL_KEYWORDS = frozenset({"weight", "ignore_index", "reduction", "label_smoothing"})


def as_module_loss(loss_fn: Any) -> Any:
    """``F.cross_entropy`` / ``F.nll_loss``, bare or a ``functools.partial`` of keywords, as its module.

    Those compute exactly what the module with the same keywords does, so
    their normaliser is known and the weights are exact; anything else
    (a lambda, a positional partial, an unknown keyword) is returned as it is.
    """
    func = getattr(loss_fn, "func", loss_fn)
    try:
        module = _FUNCTIONAL_LOSSES.get(func)
    except TypeError:  # not hashable
        return loss_fn
    if module is None:
        return loss_fn
    keywords = dict(getattr(loss_fn, "keywords", None) or {})
    if getattr(loss_fn, "args", ()) or not keywords.keys() <= _FUNCTIONAL_KEYWORDS:
        return loss_fn
    try:
        return module(**keywords)
    except (TypeError, ValueError):
        return loss_fn


def _recognised(loss_fn: Any) -> bool:
    return any(isinstance(loss_fn, c) and type(loss_fn).forward is c.forward for c in _CLASS_INDEX_LOSSES)


def _rows(targets: Any) -> int:
    return (targets if isinstance(targets, Tensor) else targets[0]).shape[0]


def _class_index_counter(loss_fn: nn.CrossEntropyLoss | nn.NLLLoss) -> Callable[[Any], float]:
    """The normaliser torch divides a class-index CE / NLL mean by: the weights of the kept targets."""
    ignore_index = loss_fn.ignore_index
    weight = None if loss_fn.weight is None else loss_fn.weight.detach().to("cpu", torch.float64)

    def count(targets: Any) -> float:
        if not isinstance(targets, Tensor) or targets.is_floating_point():
            return float(_rows(targets))  # probability targets: the mean is over rows (x extra dims)
        kept = targets[targets != ignore_index]
        if weight is None:
            return float(kept.numel())
        kept = kept.to("cpu")
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= weight.numel()):
            bad = int(kept.min()) if int(kept.min()) < 0 else int(kept.max())
            raise ValueError(
                f"targets hold class {bad}, but loss_fn.weight has {weight.numel()} classes; "
                f"targets must be in [0, {weight.numel()}) or loss_fn.ignore_index ({ignore_index})"
            )
        return float(weight[kept].sum())

    return count


def _as_count(value: object, microbatch: int) -> float:
    where = f"loss_normalizer returned {value!r} for micro-batch {microbatch}"
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}; it must return a number or a 0-dim tensor (one count per micro-batch)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}; it must return a number or a 0-dim tensor, e.g. (y != -100).sum()")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}; a count must be finite and >= 0")
    return float(value)


def loss_counts(loss_fn: Any, targets: Sequence[Any], loss_normalizer: LossNormalizer | None = None
                ) -> list[float] | None:
    """Each micro-batch's normaliser count; ``None`` for a summed loss (no normaliser: each counts 1).

    ``targets``: each micro-batch's targets, exactly as ``loss_fn`` receives them.
    """
    if loss_normalizer is None:
        loss_fn = as_module_loss(loss_fn)
        if getattr(loss_fn, "reduction", "mean") == "sum":
            return None
        counter: Callable[[Any], float] = (
            _class_index_counter(loss_fn) if _recognised(loss_fn) else lambda t: float(_rows(t))
        )
        return [counter(t) for t in targets]
    return [_as_count(loss_normalizer(t), m) for m, t in enumerate(targets)]


def weights_of(counts: Sequence[float] | None, microbatches: int) -> list[float]:
    """Per micro-batch weights that make the weighted sum of losses equal the whole batch's loss.

    ``counts``: :func:`loss_counts`. All 0 when the batch's normaliser is 0
    (see :func:`batch_loss`).
    """
    if counts is None:
        return [1.0] * microbatches
    total = sum(counts)  # equals the whole batch's count: a mean's normaliser adds up over rows
    if total == 0:
        return [0.0] * len(counts)
    return [count / total for count in counts]


def weighted_loss(loss: Tensor, weight: float) -> Tensor:
    """One micro-batch's contribution; a weight of 0 (no valid target: its mean is 0/0) adds nothing.

    The zero does not require grad, so no backward runs through this
    micro-batch and upstream stages receive no gradient for it.
    """
    if weight == 0:
        return loss.detach().new_zeros(())
    if loss.dim():
        loss = loss.reshape(())
    return loss if weight == 1 else loss * weight  # no extra autograd node for a weight of 1


def batch_loss(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """The batch's loss from the weighted micro-batch losses: NaN, as torch gives, when nothing counted."""
    loss = torch.stack(list(losses)).sum()
    if weights and not any(weights):
        return torch.full_like(loss, math.nan)
    return loss
