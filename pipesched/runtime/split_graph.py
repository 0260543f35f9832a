"""Where a split backward's B ends and its W begins, read off the autograd graph of one stage.

The *input path* is the set of nodes from which some stage input can be
reached: exactly the nodes ``torch.autograd.grad(roots, inputs)`` runs (B).
The *weight region* is the set of nodes that lead to a parameter but to no
input: what W runs. A *frontier* node is an input-path node with an edge into
the weight region (a layer's matrix product, convolution, normalisation): B
runs it for its input side, W needs its weight side. This module only reads
the graph (``next_functions``); it runs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from pipesched.runtime.autograd_internals import ACCUMULATE_GRAD, is_reentrant_checkpoint

__all__ = ["Slot", "SplitGraph"]

#: (node, input number): where a gradient enters a node.
Slot = tuple[Node, int]


class SplitGraph:
    """The nodes below ``root_edges``, sorted into B's and W's.

    ``order``: every reachable node -> its rank in a children-first order.
    ``param_nodes``: the ``AccumulateGrad`` node of each reachable parameter
    -> the parameter (found through the node's ``variable``, so no
    parameter's node has to be looked up, hence created, up front);
    ``params=None``: every reachable leaf that is not an input.
    ``input_path``: nodes with a path to an input (what B runs).
    ``reaches_param``: nodes from which a parameter's node can be reached
    (those nodes included). ``weight_region``: those not on the input path
    (what W runs). ``frontier``: input-path node -> its edges into the
    weight region, as (output index, (child, child's input number)), roots
    first. ``reentrant``: a reentrant checkpoint's node, if the graph has
    one (its backward cannot run in B's or W's engine call: the backward
    must stay whole).
    """

    def __init__(
        self, root_edges: Sequence[GradientEdge], input_nodes: set[Node], params: dict[int, Tensor] | None
    ) -> None:
        children: dict[Node, Any] = {}  # node -> its next_functions
        order: list[Node] = []  # children first
        for edge in root_edges:
            if edge.node in children:
                continue
            children[edge.node] = edge.node.next_functions
            stack = [(edge.node, iter(children[edge.node]))]
            while stack:
                node, pending = stack[-1]
                for child, _ in pending:
                    if child is not None and child not in children:
                        children[child] = child.next_functions
                        stack.append((child, iter(children[child])))
                        break
                else:
                    stack.pop()
                    order.append(node)
        self.order = {node: rank for rank, node in enumerate(order)}
        self.reentrant = next((node for node in order if is_reentrant_checkpoint(node)), None)
        self.param_nodes: dict[Node, Tensor] = {}
        self.input_path: set[Node] = set()
        self.reaches_param: set[Node] = set()
        for node in order:
            kids = [c for c, _ in children[node] if c is not None]
            if not kids:
                if isinstance(node, ACCUMULATE_GRAD) and (
                    node not in input_nodes if params is None else id(node.variable) in params
                ):
                    self.param_nodes[node] = node.variable
                    self.reaches_param.add(node)
                continue
            if any(c in input_nodes or c in self.input_path for c in kids):
                self.input_path.add(node)
            if any(c in self.reaches_param for c in kids):
                self.reaches_param.add(node)
        self.weight_region = self.reaches_param - self.input_path
        self.frontier: dict[Node, list[tuple[int, Slot]]] = {}
        for node in reversed(order):
            if node in self.input_path:
                edges = [(j, (c, k)) for j, (c, k) in enumerate(children[node]) if c in self.weight_region]
                if edges:
                    self.frontier[node] = edges
