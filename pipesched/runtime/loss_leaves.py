"""The leaves a step's loss may reach when only the pipeline's own parameters are combined.

Inside one process a backward, split or not, accumulates into every leaf it
reaches, as ``loss.backward()`` does: a loss's own parameters, a model
weight that a regulariser in the loss reads. That is exact as long as the
gradient lands where the caller's optimizer finds it. Two setups break that
silently, so the pipeline refuses them instead:

* data parallelism (``data_parallel_group``): after a step only the
  pipeline's ``parameters()`` (the model's, and those of a ``loss_fn`` that
  is an ``nn.Module``) are summed over the replicas. A tensor the loss
  closes over would keep each replica's own gradient, and the replicas
  would drift apart for good;
* ``DistributedPipeline``: a parameter of a stage on another rank (a
  regulariser on the first layer's weight, computed on the last rank) is,
  in the last rank's process, a copy nobody trains; its gradient would be
  lost and the owning rank would never get the term.

The check walks the loss's graph on the last stage, the first micro-batch's
of each step, only in those two setups, and names the first leaf that is
neither a stage input nor an allowed parameter. Once a step, not once per
micro-batch: the walk costs about 1 µs per autograd node (264 µs for four
small transformer layers and a head), and every micro-batch runs the same
code; a loss that reaches another leaf only for some data is not caught.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

__all__ = ["OTHER_RANKS", "REPLICAS_DRIFT", "check_loss_leaves"]

#: Why a stray leaf is refused under data parallelism.
REPLICAS_DRIFT = (
    "with data_parallel_group only the pipeline's parameters are combined across replicas, so this tensor "
    "would keep each replica's own gradient and the replicas would drift apart"
)
#: Why a stray leaf is refused by a multi-process pipeline.
OTHER_RANKS = (
    "each process trains only its own stages' parameters and loss_fn's; a parameter of a stage on another rank "
    "(a regulariser on an earlier layer's weight) is a copy here that nobody trains, and its owner would never "
    "get this term's gradient"
)

_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def check_loss_leaves(roots: Sequence[Tensor], inputs: Sequence[Tensor], allowed: Collection[int],
                      why: str) -> None:
    """Raise ``ValueError`` if the graph below ``roots`` reaches a leaf not in ``inputs`` nor ``allowed``.

    ``allowed``: the ``id`` of every tensor the gradient may land in (the
    pipeline's parameters, the stage's current ones). ``why``: what would go
    wrong otherwise, for the message.
    """
    own = {id(x) for x in inputs}
    seen: set[object] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node, _ACCUMULATE_GRAD):
            leaf = node.variable
            if id(leaf) not in own and id(leaf) not in allowed:
                raise ValueError(
                    f"loss_fn reaches a tensor that requires grad but is not one of this pipeline's parameters "
                    f"(shape {tuple(leaf.shape)}, {leaf.dtype}): {why}. Make it a parameter of loss_fn (an "
                    f"nn.Module loss, whose parameters the pipeline treats as its own), or compute that term "
                    f"outside the pipeline"
                )
            continue
        stack.extend(child for child, _ in node.next_functions if child is not None)
