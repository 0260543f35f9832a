"""The private torch names the split backward uses, each looked up once, here.

The split backward (:mod:`pipesched.runtime.split_backward`) does what no
public torch API does: it calls the autograd engine with graph edges as
roots, recognises a leaf's accumulator and a custom ``autograd.Function``'s
node by their classes, and spots a reentrant ``torch.utils.checkpoint`` by
its node. Looking each name up here, with a fallback instead of an
``AttributeError`` at import, keeps a torch release that renames one from
breaking ``import pipesched``; :mod:`pipesched.runtime.split_selfcheck` then
says which one is missing, once, before the first split backward runs.
(Reading and releasing saved tensors is :mod:`pipesched.runtime.saved_tensors`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ACCUMULATE_GRAD", "PYTHON_NODE", "is_python_node", "is_reentrant_checkpoint", "run_engine"]


class _Missing:
    """Stands in for a class this torch release lacks: nothing is an instance of it."""


#: The node that accumulates into a leaf's ``.grad`` (its ``variable`` is the leaf).
ACCUMULATE_GRAD: type = getattr(getattr(torch._C, "_functions", None), "AccumulateGrad", _Missing)
#: The base class of a custom ``autograd.Function``'s backward node (``BackwardCFunction``), a Python node.
PYTHON_NODE: type = getattr(torch._C, "_FunctionBase", _Missing)
#: The ``autograd.Function`` of ``torch.utils.checkpoint(..., use_reentrant=True)``.
_REENTRANT_CHECKPOINT: Any = getattr(torch.utils.checkpoint, "CheckpointFunction", None)


def is_python_node(node: Any) -> bool:
    """True for a custom ``autograd.Function``'s node (a ``torch.compile``'d graph's node is one)."""
    return isinstance(node, PYTHON_NODE)


def is_reentrant_checkpoint(node: Any) -> bool:
    """True for the node of a ``torch.utils.checkpoint(..., use_reentrant=True)`` region.

    Its backward re-runs the region's forward and calls
    ``torch.autograd.backward`` inside the outer backward, which torch allows
    only in an engine call with no ``inputs`` (``torch.autograd.grad`` and
    ``backward(inputs=...)`` raise). The node's class is generated per
    Function and remembers it as ``_forward_cls``.
    """
    return _REENTRANT_CHECKPOINT is not None and getattr(type(node), "_forward_cls", None) is _REENTRANT_CHECKPOINT


def run_engine(roots: Sequence[Any], grads: Sequence[Tensor], inputs: Sequence[Tensor] = ()) -> None:
    """One engine call: accumulate into ``inputs``' ``.grad`` (every reachable leaf if empty); free the graph.

    The engine itself, not ``torch.autograd.backward``: roots may be graph
    edges (``GradientEdge``), and a root's gradient may still need the
    reduction (a bias gradient summed over rows) and the dtype cast the
    engine applies to every gradient it routes; the Python wrapper would
    reject its shape. Two roots on one edge add up, as two parents' would.
    """
    torch.autograd.Variable._execution_engine.run_backward(  # type: ignore[attr-defined]
        tuple(roots), tuple(grads), False, False, tuple(inputs), True, True
    )
