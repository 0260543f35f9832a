"""A once-per-process check that the torch internals the split backward leans on still behave.

The split backward relies on behaviour no torch API promises
(:mod:`pipesched.runtime.autograd_internals`, :mod:`~pipesched.runtime.saved_tensors`,
:mod:`~pipesched.runtime.frontier`). A torch release that changed one of them would
otherwise show up as a wrong gradient, a leak or silent slowness, far from
its cause. So before the first split backward of a process, :func:`self_check`
runs a few tiny float64 graphs (well under a millisecond of compute) and
checks each behaviour directly:

* the private names exist: the engine's ``run_backward``, the
  ``AccumulateGrad`` class (with the leaf as its ``variable``) and the base
  class of a custom Function's node;
* a node pre-hook sees the gradient after the output's tensor hooks, and a
  node post-hook sees a custom Function's weight-side output in an engine
  call that does not need it (B keeps both);
* the engine call W makes, with graph edges as roots, accumulates a raw
  (unreduced) bias gradient into ``.grad`` correctly, and a built-in node
  called directly (as W calls the frontier) gives its weight gradient;
* for speed and memory only: such a directly called node computes only the
  outputs the running graph task needs, and a node's saved tensors are
  found by name (so B can release them).

A broken correctness behaviour raises ``RuntimeError`` (every split backward
then raises it again: no schedule with W can be trusted); a speed or memory
one warns once and lets the split backward run, still exact. It
runs on a thread of its own, so no caller's grad mode, autocast or
saved-tensor hooks (all per thread) can change what it sees.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from pipesched.runtime.autograd_internals import ACCUMULATE_GRAD, is_python_node, run_engine
from pipesched.runtime.frontier import weight_edge_gradients
from pipesched.runtime.saved_tensors import saved_tensors

__all__ = ["self_check"]

_lock = threading.Lock()
_outcome: list[tuple[list[str], list[str]]] = []  # (broken, slow), once checked


def self_check() -> None:
    """Check once per process (later calls: the cached outcome); raise if split backward cannot be exact."""
    with _lock:
        if not _outcome:
            found: list[tuple[list[str], list[str]]] = []
            thread = threading.Thread(target=lambda: found.append(_check()), name="pipesched-split-selfcheck")
            thread.start()
            thread.join()
            _outcome.append(found[0] if found else (["the self-check itself failed to run"], []))
            if _outcome[0][1]:
                warnings.warn("pipesched split backward (zero-bubble schedules' B/W), still exact but slower with "
                              f"this torch {torch.__version__}: " + "; ".join(_outcome[0][1]), stacklevel=3)
    broken = _outcome[0][0]
    if broken:
        raise RuntimeError(
            f"pipesched's split backward (the B/W of zero-bubble schedules) relies on torch internals that torch "
            f"{torch.__version__} changed: {'; '.join(broken)}. Use a schedule without W actions (1f1b, gpipe, "
            "interleaved-1f1b) or a torch release pipesched supports"
        )


def _check() -> tuple[list[str], list[str]]:
    """(broken: what exactness needs, slow: what only speed or memory needs); every check runs on its own."""
    found: tuple[list[str], list[str]] = ([], [])
    for check, kind in ((_names, 0), (_hooks_order, 0), (_edge_roots, 0), (_direct_call, 0), (_saved_slots, 1),
                        (_direct_call_computes_only_what_is_needed, 1)):
        try:
            problem = check()
        except Exception as error:  # noqa: BLE001 - any failure is the finding
            problem = f"{check.__name__.strip('_')} raised {type(error).__name__}: {error}"
        if problem:
            found[kind].append(problem)
    return found


class _Scaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        return grad * w, grad * x


def _leaf(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _names() -> str | None:
    if not callable(getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None)):
        return "torch.autograd.Variable._execution_engine.run_backward is gone"
    w = _leaf(1.0)
    node = get_gradient_edge(w).node
    if not isinstance(node, ACCUMULATE_GRAD) or getattr(node, "variable", None) is not w:
        return "a leaf's gradient node is no longer torch._C._functions.AccumulateGrad with the leaf as .variable"
    x = _leaf(2.0)
    if not is_python_node(_Scaled.apply(x, w).grad_fn) or is_python_node((x * w).grad_fn):
        return "a custom autograd.Function's node no longer derives from torch._C._FunctionBase (and built-ins not)"
    return None


def _hooks_order() -> str | None:
    x, w = _leaf(2.0), _leaf(3.0)
    h = _Scaled.apply(x, w)
    h.register_hook(lambda g: 2 * g)
    seen: dict[str, tuple[Tensor | None, ...]] = {}
    h.grad_fn.register_prehook(lambda grads: seen.__setitem__("in", grads))
    h.grad_fn.register_hook(lambda outs, grads: seen.__setitem__("out", outs))
    torch.autograd.grad([h], [x], [torch.ones(1, dtype=torch.float64)])
    if "in" not in seen or seen["in"][0] is None or seen["in"][0].item() != 2.0:
        return "a node pre-hook no longer sees the gradient after the output's tensor hooks"
    if "out" not in seen or seen["out"][1] is None or seen["out"][1].item() != 4.0:
        return "a node post-hook no longer sees a custom Function's outputs the engine call does not need"
    return None


def _edge_roots() -> str | None:
    bias = _leaf(1.0, 2.0)
    edge = get_gradient_edge(bias)  # a raw (3, 2) gradient into a (2,) leaf's slot, as a bias's from a layer
    run_engine([GradientEdge(edge.node, edge.output_nr)], [torch.ones(3, 2, dtype=torch.float64)], [bias])
    if bias.grad is None or bias.grad.tolist() != [3.0, 3.0]:
        return "the engine no longer reduces a raw gradient given at a graph edge (W's seeds)"
    return None


def _product() -> tuple[Node, Node, int]:
    """A matrix product's node (1x2 @ 2x1) and its weight-side edge."""
    x, w = _leaf(1.0, 2.0).reshape(1, 2), _leaf(3.0, 4.0).reshape(2, 1)
    node = (x @ w).grad_fn
    weight_child, k = node.next_functions[1]
    return node, weight_child, k


def _direct_call() -> str | None:
    node, weight_child, k = _product()
    seeds = weight_edge_gradients([(node, (torch.ones(1, 1, dtype=torch.float64),), [(1, (weight_child, k))])])
    if len(seeds) != 1 or seeds[0][2].tolist() != [[1.0], [2.0]]:
        return "a built-in node called directly (W) no longer gives its weight gradient"
    return None


def _saved_slots() -> str | None:
    if not saved_tensors(_product()[0]):
        return "saved tensors are no longer found as grad_fn._raw_saved_* (B cannot release them early)"
    return None


def _direct_call_computes_only_what_is_needed() -> str | None:
    node, weight_child, k = _product()
    if _call_inside_task(node, weight_child, k)[0] is not None:
        return ("a directly called node computes outputs the running graph task does not need (W repeats the "
                "input-gradient product)")
    return None


def _call_inside_task(node: Node, child: Node, k: int) -> tuple[Tensor | None, ...]:
    """Call ``node`` directly inside a graph task targeting only (child, k); return its raw outputs."""
    outputs: list[tuple[Tensor | None, ...]] = []
    host = torch.zeros((), requires_grad=True)
    with torch.enable_grad():
        root = host.view_as(host)

    def call(_: object) -> None:
        with torch.no_grad():
            outputs.append(node(torch.ones(1, 1, dtype=torch.float64)))

    handle = root.grad_fn.register_prehook(call)
    try:
        torch.autograd.grad([root], [GradientEdge(child, k), host], [torch.ones(())], allow_unused=True,
                            retain_graph=False)
    finally:
        handle.remove()
    return tuple(outputs[0])
