"""The frontier nodes of a split backward: what B keeps of each, and how W gets its weight side.

A frontier node (:mod:`pipesched.runtime.split_graph`) is a layer's backward
that B runs for its input-side outputs and W needs for its weight-side ones.
During B's engine call each frontier node carries two hooks
(:class:`FrontierCapture`):

* a pre-hook keeps its incoming gradient: the engine's sum, after the
  tensor hooks of the layer's output (``register_hook``, ``retain_grad``)
  ran on it. Those hooks must run once, so W must never hand this gradient
  to the engine as an incoming gradient of the node again.
* a post-hook keeps its outputs as B computed them, after the node's own
  post-hooks. A built-in node computes only the outputs B's graph task
  needs (``task_should_compute_output``): its weight-side outputs are
  ``None``, and W calls the node again, directly, on the kept gradient
  (:func:`weight_edge_gradients`). A custom ``autograd.Function``'s node
  computes what ``ctx.needs_input_grad`` says, fixed at forward time, so
  its weight side too (a ``torch.compile``'d stage is one such node, its
  whole backward graph): those outputs are already the weight gradients,
  every hook applied once, and W uses them as they are. Running such a
  node again in W, in an engine call rooted at it, is what used to apply
  its output's tensor hooks twice and run a compiled stage's backward twice.

W's part is then a list of *seeds*: (weight-region child, input number,
gradient), which one engine call routes into the parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from pipesched.runtime.autograd_internals import is_python_node
from pipesched.runtime.split_graph import Slot

__all__ = ["FrontierCapture", "Seed", "ToCall", "weight_edge_gradients"]

#: A gradient for W's engine call: (node, its input number, gradient).
Seed = tuple[Node, int, Tensor]
#: A frontier node W still calls: the node, its kept incoming gradient, its edges into the weight region.
ToCall = tuple[Node, tuple[Tensor | None, ...] | None, list[tuple[int, Slot]]]


class FrontierCapture:
    """Hooks on the frontier nodes for the duration of B's engine call (a context manager).

    After it, :meth:`split` says which nodes W must still call and which
    already gave their weight-side gradients.
    """

    def __init__(self, frontier: dict[Node, list[tuple[int, Slot]]]) -> None:
        self._nodes = list(frontier)
        self._edges = [frontier[node] for node in self._nodes]
        self._incoming: list[tuple[Tensor | None, ...] | None] = [None] * len(self._nodes)
        self._outgoing: list[dict[int, Tensor | None] | None] = [None] * len(self._nodes)
        self._handles: list[Any] = []

    def __enter__(self) -> FrontierCapture:
        for n, node in enumerate(self._nodes):
            self._handles.append(node.register_prehook(functools.partial(_keep_incoming, self._incoming, n)))
            wanted = [j for j, _ in self._edges[n]]
            self._handles.append(node.register_hook(functools.partial(_keep_outgoing, self._outgoing, n, wanted)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def split(self) -> tuple[list[ToCall], list[Seed]]:
        """(the frontier nodes W must call, the weight-side gradients B already computed).

        A node is done in B when it is a custom Function's (whatever it
        returned is what a plain backward would have routed) or, for a
        built-in node, when B computed every one of its weight-side outputs
        (a torch release that computed them anyway would make W's call a
        wasted repeat).
        """
        to_call: list[ToCall] = []
        seeds: list[Seed] = []
        for node, edges, kept, outputs in zip(self._nodes, self._edges, self._incoming, self._outgoing):
            if outputs is not None and (is_python_node(node) or all(g is not None for g in outputs.values())):
                seeds.extend((child, k, outputs[j]) for j, (child, k) in edges if outputs[j] is not None)
            elif not is_python_node(node):
                to_call.append((node, kept, edges))
        self._incoming, self._outgoing = [], []
        return to_call, seeds


def _keep_incoming(store: list[Any], index: int, grad_outputs: tuple[Tensor | None, ...]) -> None:
    """Pre-hook of frontier node ``index`` during B: keep the gradient it receives (hooks applied)."""
    store[index] = tuple(grad_outputs)


def _keep_outgoing(
    store: list[Any], index: int, wanted: list[int],
    grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...],
) -> None:
    """Post-hook of frontier node ``index`` during B: keep its weight-side outputs (its post-hooks applied).

    Only those: holding the input-side ones too would keep the engine from
    summing into their buffers in place.
    """
    store[index] = {j: grad_inputs[j] for j in wanted}


def weight_edge_gradients(to_call: Sequence[ToCall]) -> list[Seed]:
    """Call built-in frontier nodes on their kept gradients for their weight-side outputs only.

    Each node is called directly, inside a pre-hook of a one-node graph task
    whose targets are the frontier's weight-region slots: a node's backward
    asks the running graph task which of its outputs are needed, and the
    task knows only those slots, so no input-side output is computed and no
    node below runs. A direct call runs no hook (they ran in B). One seed
    per edge, not summed: a directly called node's output is raw (a bias
    gradient not yet summed over rows) until the engine reduces it to its
    slot's shape.
    """
    work = [(node, kept, edges) for node, kept, edges in to_call
            if kept is not None and any(g is not None for g in kept)]
    if not work:
        return []
    for node, _, _ in work:
        if is_python_node(node):  # FrontierCapture.split keeps these in B
            raise TypeError(f"{node.name()} is a custom Function's node: its outputs come from B, it is never called")
    seeds: list[Seed] = []

    def call_frontier(_: Any) -> None:
        with torch.no_grad():
            for node, kept, edges in work:
                outputs = node(*kept)
                outputs = (outputs,) if isinstance(outputs, Tensor) else outputs
                seeds.extend((child, k, outputs[j]) for j, (child, k) in edges if outputs[j] is not None)

    host = torch.zeros((), requires_grad=True)
    with torch.enable_grad():
        root = host.view_as(host)
    handle = root.grad_fn.register_prehook(call_frontier)
    try:
        slots = {slot: None for _, _, edges in work for _, slot in edges}
        torch.autograd.grad(  # the host leaf is a target too, so the engine runs the root node and its hook
            [root], [GradientEdge(node, k) for node, k in slots] + [host], [torch.ones(())], allow_unused=True
        )
    finally:
        handle.remove()
    return seeds
