"""When a stage's backward cannot be split into B and W, and how B then runs it whole.

Two things in a stage make a split backward wrong or impossible:

* a reentrant ``torch.utils.checkpoint`` (``use_reentrant=True``, the
  default of many Hugging Face models): its backward re-runs the region and
  calls ``torch.autograd.backward`` itself, which torch allows only inside
  an engine call with no ``inputs``; B's ``torch.autograd.grad`` and W's
  engine call both have some. Found by its node in the stage's graph
  (:func:`pipesched.runtime.autograd_internals.is_reentrant_checkpoint`),
  which no way of calling it can hide.
* a legacy ``Module.register_backward_hook``: a post-hook on the layer's
  last node that sees, and may rewrite, the input and the weight gradients
  together. B computes only the input side, so the hook would see ``None``
  for the weights and what it returns would never reach them. Found on the
  stage's modules (``nn.Module``'s private hook dicts: node hooks cannot be
  listed).

Such a stage's B then runs its whole backward as 1F1B does (one engine call
into every reachable leaf), its W does nothing, and a warning says so once
per stage and cause, with the fix that makes it split again: exact, only
its W no longer fills bubbles.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node

from pipesched.runtime.autograd_internals import run_engine

__all__ = ["legacy_backward_hooks", "warn_once", "whole_backward", "why_whole"]


def legacy_backward_hooks(module: nn.Module | None) -> list[str]:
    """The names of ``module``'s submodules with a legacy ``register_backward_hook`` ('*': a global one).

    Read from ``nn.Module``'s private hook dicts (``getattr`` with defaults:
    a torch release that renames them finds none rather than failing).
    """
    found = []
    nn_module = torch.nn.modules.module
    if getattr(nn_module, "_global_backward_hooks", None) \
            and getattr(nn_module, "_global_is_full_backward_hook", None) is False:
        found.append("*")
    if module is not None and any(_has_legacy_hook(m) for m in module.modules()):
        # (named only when found: B asks for every micro-batch, since hooks may come and go between steps)
        found += [name or "(the stage)" for name, m in module.named_modules() if _has_legacy_hook(m)]
    return found


def _has_legacy_hook(module: nn.Module) -> bool:
    return bool(getattr(module, "_backward_hooks", None)) and getattr(module, "_is_full_backward_hook", None) is False


def why_whole(reentrant: Node | None, module: nn.Module | None) -> str | None:
    """Why this backward cannot be split (None: it can)."""
    if reentrant is not None:
        return (f"it holds a reentrant torch.utils.checkpoint ({reentrant.name()}): torch refuses to "
                "back-propagate through one in a split backward; pass use_reentrant=False to "
                "torch.utils.checkpoint to split it")
    hooked = legacy_backward_hooks(module)
    if hooked:
        which = "a global legacy register_module_backward_hook" if hooked[0] == "*" else \
            f"module {hooked[0]!r} has a legacy register_backward_hook"
        return (f"{which}, whose rewritten grad_input must include the weight gradients, which a split backward "
                "computes later; use register_full_backward_hook to split it")
    return None


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def warn_once(name: str, why: str) -> None:
    """Say once per (stage, cause) and process that a zero-bubble schedule lost this stage's W."""
    with _warned_lock:
        if (name, why) in _warned:
            return
        _warned.add((name, why))
    warnings.warn(f"{name}: its backward runs whole in B and its W does nothing (so its weight gradient work no "
                  f"longer fills bubbles), because {why}", stacklevel=3)


def whole_backward(
    root_edges: list[GradientEdge], root_grads: list[Tensor], inputs: Sequence[Tensor],
    wanted: list[int], name: str, why: str,
) -> tuple[Tensor | None, ...]:
    """B as a plain backward (into every reachable leaf); the inputs' gradients from their ``.grad``, restored."""
    for i in wanted:
        if not inputs[i].is_leaf:
            raise ValueError(f"{name}: inputs[{i}] is not a leaf, and its backward must run whole because {why}; "
                             "pass the stage's detached input (x.detach().requires_grad_())")
    leaves = [inputs[i] for i in wanted]
    before = [x.grad for x in leaves]
    for x in leaves:
        x.grad = None
    input_grads: list[Tensor | None] = [None] * len(inputs)
    try:
        run_engine(root_edges, root_grads)  # no inputs: the engine call a reentrant checkpoint accepts
        for i in wanted:
            input_grads[i] = inputs[i].grad
    finally:
        for x, grad in zip(leaves, before):
            x.grad = grad
    return tuple(input_grads)
