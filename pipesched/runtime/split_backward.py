"""A stage's backward in two halves: B (input gradients) now, W (parameter gradients) later.

Zero-bubble schedules run a stage's backward as two actions: ``B`` computes
only the gradient of the stage's *inputs* (what the previous stage waits
for), ``W`` only the gradients of its *parameters* (which nobody waits for,
so it fills a bubble). Each half must do only its own work: a W that re-ran
the whole backward would cost more than it saves.

How the graph is split. The *input path* is the set of autograd nodes from
which some input can be reached: exactly the nodes
``torch.autograd.grad(roots, inputs)`` runs, and the engine asks each of
them only for the gradients that lead to an input (an ``AddmmBackward``
computes ``dY @ W`` and skips ``X.T @ dY``; a ``ConvolutionBackward`` gets
an output mask). The *weight region* is the set of nodes that lead to a
parameter but to no input. A *frontier* node is an input-path node with an
edge into the weight region: the layer's matrix product, convolution,
normalisation.

* B runs ``torch.autograd.grad`` from the roots to the inputs and, with a
  pre-hook, keeps each frontier node's incoming gradient (the engine's
  sum). It then releases the tensors saved by the other input-path nodes
  (a GELU's input, a dropout mask): W will not run them. The frontier
  nodes keep theirs (the product's input), as does the weight region.
* W calls each frontier node once more on its kept gradient, inside a
  small graph task of its own whose targets are the frontier's
  weight-region children. A node's backward computes an output only if
  the running graph task needs that output's child
  (``task_should_compute_output``), so each frontier node now computes
  exactly its weight-side outputs, and nothing below it runs. W then runs
  one backward from those outputs (and from any root that reaches no input:
  the first stage's whole graph) into the parameters: ``AccumulateGrad``
  accumulates exactly as in a plain backward (into ``.grad``, summing every
  use, running parameter hooks, leaving alone a parameter that gets no
  gradient). A custom ``autograd.Function`` node cannot be called from
  Python: W runs it in an engine call of its own, which a post-hook ends
  right after it.

No node runs twice for the same output, whatever the graph: a parameter
used by two layers on one path (a re-used layer, tied weights) gets both
uses' gradients in W. Were a torch release to stop consulting the running
graph task in a directly called node, W would compute the frontier's
input-side outputs again and drop them: slower, still exact
(``tests/test_split_backward.py`` counts the FLOPs of each half).

``torch.distributed.pipelining``'s ``stage_backward_input`` /
``stage_backward_weight`` split at similar nodes; this module differs in
that W never re-runs the input path (torch's re-runs the path between two
uses of a shared parameter), the first stage's W does all of its weight
work, B frees what W does not need, and W makes two engine calls however
many layers the stage has (one per parameter group in torch's).

Hooks: module backward hooks and tensor hooks (``register_hook``,
``retain_grad``) on activations run in B, once; parameter hooks
(``register_hook``, post-accumulate-grad) in W, once. A hook registered on
a frontier node itself (``grad_fn.register_hook``) runs in B only.

Limits: a custom ``autograd.Function`` layer computes in each half what
its ``ctx.needs_input_grad`` says, fixed at forward time (its input and its
weight gradient both), so it does its whole backward in B and again in W;
the results are still exact. W calls the frontier nodes on the calling
thread's current CUDA stream, not the stream their forward ran on (not
tested on CUDA). A reentrant
``torch.utils.checkpoint`` region inside the stage cannot be split (torch
refuses ``autograd.grad`` through it, and B raises its error); the
non-reentrant one (``use_reentrant=False``) works, but its saved tensors
live under saved-tensor hooks, which B does not release and
:meth:`WeightWork.nbytes` does not count (as for any saved-tensor hooks,
e.g. CPU offload).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from pipesched.runtime.saved_tensors import (
    count_storage,
    release_saved,
    saved_tensors,
    storage_key,
)

__all__ = ["WeightWork", "backward_input"]

#: (node, input number): where a gradient enters a node; the key of edge gradients.
_Slot = tuple[Node, int]
#: The type of the node that accumulates into a leaf's ``.grad`` (its ``variable`` is the leaf).
_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad
#: A frontier node, the gradient B kept for it, and its edges into the weight region (output index, slot).
_Frontier = tuple[Node, tuple[Tensor | None, ...] | None, list[tuple[int, _Slot]]]


def backward_input(
    roots: Sequence[Tensor],
    grad_roots: Sequence[Tensor | None] | None,
    inputs: Sequence[Tensor],
    parameters: Iterable[Tensor] | None = None,
) -> tuple[tuple[Tensor | None, ...], WeightWork]:
    """B: the gradients of ``inputs``, and the W that will give ``parameters`` theirs.

    ``roots`` are the stage's outputs (or its loss) and ``grad_roots`` their
    gradients (``None`` for a scalar root: a gradient of one, as for a loss;
    ``grad_roots=None``: every root is a scalar). A root's shape is checked
    against its graph, not its data, so a root whose data was emptied after
    sending (the engine does) is fine.

    Returns the input gradients in ``inputs`` order (what
    ``torch.autograd.grad(roots, inputs, grad_roots, allow_unused=True)``
    returns; ``None`` for an input that needs no gradient or was not used;
    ``inputs``' ``.grad`` is not touched) and a :class:`WeightWork` whose
    ``run()`` later accumulates into the ``.grad`` of ``parameters`` what
    ``torch.autograd.backward(roots, grad_roots, inputs=parameters)`` would.
    Parameters that do not require grad are skipped. ``parameters=None``
    (what the engine passes): every leaf the roots reach that is not one of
    ``inputs`` (a loss's own parameters, a parameter of another stage that
    the loss reads), exactly the leaves a plain backward accumulates into,
    found in the graph rather than listed. The graph is consumed as by one
    plain backward: after W, backing through ``roots`` again fails.

    Inputs that require grad should be the stage's own leaves (the detached
    inputs the engine makes); a non-leaf input whose graph reaches one of
    ``parameters`` is rejected, because its gradient would have to flow past
    the stage boundary.
    """
    root_edges, root_grads = _check_roots(roots, grad_roots)
    params = None if parameters is None else _check_parameters(parameters)
    input_edges: dict[int, GradientEdge] = {}  # position in inputs -> its edge
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{i}] is a {type(x).__name__}, not a Tensor: pass the stage's input tensors")
        if x.requires_grad:
            input_edges[i] = get_gradient_edge(x)
    by_id = None if params is None else {id(p): p for p in params}
    for i, x in enumerate(inputs if by_id is not None else ()):
        if id(x) in by_id and x.requires_grad:
            raise ValueError(f"inputs[{i}] is also in parameters: a tensor is either a stage input or a parameter")

    split = _Split(root_edges, {e.node for e in input_edges.values()}, by_id)
    for i, edge in input_edges.items():
        if edge.node in split.reaches_param:
            raise ValueError(
                f"inputs[{i}] is not a leaf and its graph ({edge.node.name()}) reaches a parameter: its gradient "
                "would flow past the stage boundary; pass the stage's detached input (x.detach().requires_grad_())"
            )

    frontier = list(split.frontier)
    captured: list[tuple[Tensor | None, ...] | None] = [None] * len(frontier)
    root_seeds = [(e, g) for e, g in zip(root_edges, root_grads) if e.node in split.weight_region]
    needs_w = bool(frontier or root_seeds)
    grads: Sequence[Tensor | None] = ()
    if input_edges:
        handles = [node.register_prehook(functools.partial(_capture, captured, n)) for n, node in enumerate(frontier)]
        try:
            grads = torch.autograd.grad(
                root_edges, list(input_edges.values()), root_grads, retain_graph=needs_w, allow_unused=True
            )
        finally:
            for handle in handles:
                handle.remove()
    input_grads: list[Tensor | None] = [None] * len(inputs)
    for position, grad in zip(input_edges, grads):
        input_grads[position] = grad
    if not needs_w:
        return tuple(input_grads), WeightWork._empty()
    for node in split.input_path - split.frontier.keys():  # B ran them, W will not
        release_saved(node)
    work = WeightWork(
        frontier=[(node, kept, split.frontier[node]) for node, kept in zip(frontier, captured)],
        root_seeds=root_seeds,
        parameters=list(split.param_nodes.values()),
        anchors=root_edges,
        weight_region=[node for node in split.order if node in split.weight_region],
        exclude=list(split.param_nodes.values()) if params is None else params,
    )
    return tuple(input_grads), work


class WeightWork:
    """W of one (stage, micro-batch): what parameter gradients still need, and nothing else.

    Holds the frontier nodes with their kept incoming gradients, the
    gradients of roots that reach no input, and references to the roots'
    nodes (a custom autograd Function's node is owned by its parents, not by
    its Python object). The tensors it keeps alive are those saved by the
    frontier nodes and the weight region: :meth:`nbytes` counts them.
    """

    def __init__(
        self,
        frontier: list[_Frontier],
        root_seeds: list[tuple[GradientEdge, Tensor]],
        parameters: list[Tensor],
        anchors: list[GradientEdge],
        weight_region: list[Node],
        exclude: Sequence[Tensor],
    ) -> None:
        self._frontier = frontier
        self._root_seeds = root_seeds
        self._parameters = parameters  # those the weight region leads to
        self._anchors = anchors
        self._weight_region = weight_region
        self._exclude = {storage_key(p) for p in exclude}
        self._nbytes: int | None = None
        self._state = "pending"  # -> "ran" | "released"

    @classmethod
    def _empty(cls) -> WeightWork:
        """The W of a stage whose parameters get no gradient (none, or none reached): a no-op."""
        return cls([], [], [], [], [], [])

    @property
    def pending(self) -> bool:
        """True until :meth:`run` or :meth:`release`."""
        return self._state == "pending"

    @property
    def empty(self) -> bool:
        """True when there is no parameter gradient to compute (W would do nothing)."""
        return not (self._frontier or self._root_seeds)

    def nbytes(self) -> int:
        """Bytes W keeps alive until it runs: kept gradients and saved activations, each storage once.

        Counts the incoming gradients kept for the frontier nodes and the
        roots that reach no input, and the tensors saved by the nodes W will
        run; not the parameters' own storage. 0 once W has run or was released.
        """
        if self._state != "pending":
            return 0
        if self._nbytes is None:
            sizes: dict[tuple[Any, ...], int] = {}
            for _, kept, _ in self._frontier:
                for grad in kept or ():
                    count_storage(sizes, grad, self._exclude)
            for _, grad in self._root_seeds:
                count_storage(sizes, grad, self._exclude)
            for node in [node for node, _, _ in self._frontier] + self._weight_region:
                for tensor in saved_tensors(node):
                    count_storage(sizes, tensor, self._exclude)
            self._nbytes = sum(sizes.values())
        return self._nbytes

    def run(self) -> None:
        """Accumulate the parameter gradients into ``.grad``, then release everything held.

        Raises ``RuntimeError`` if called a second time (or after
        :meth:`release`): the gradients of this micro-batch are already in
        ``.grad``, and running again would add them twice.
        """
        if self._state != "pending":
            raise RuntimeError(
                f"WeightWork.run() called after it {self._state}: this micro-batch's W already ran (its parameter "
                "gradients are in .grad) or was released; each backward_input() gives one W to run once"
            )
        self._state = "ran"
        try:
            seeds = _weight_edge_gradients(self._frontier) + [(e.node, e.output_nr, g) for e, g in self._root_seeds]
            if seeds and self._parameters:  # (an empty inputs tuple would mean every leaf)
                # The engine itself, not torch.autograd.backward: a frontier node's raw output can still need
                # the reduction (a bias gradient summed over rows) and the dtype cast that the engine applies
                # to every gradient it routes, roots included, each root on its own; the Python wrapper would
                # reject the shape. Two roots on one slot add up in the slot's buffer, as two parents' would.
                torch.autograd.Variable._execution_engine.run_backward(  # type: ignore[attr-defined]
                    tuple(GradientEdge(node, k) for node, k, _ in seeds), tuple(g for _, _, g in seeds),
                    False, False, tuple(self._parameters), True, True,
                )
        finally:
            self._clear()

    def release(self) -> None:
        """Drop everything held without computing (a cancelled step). Idempotent; run() then raises."""
        if self._state == "pending":
            self._state = "released"
            for node in self._weight_region:  # run() frees these by running them
                release_saved(node)
            self._clear()

    def _clear(self) -> None:
        """Free the frontier nodes' saved tensors (as a plain backward would) and every reference."""
        for node, _, _ in self._frontier:
            release_saved(node)
        self._frontier, self._root_seeds, self._parameters = [], [], []
        self._anchors, self._weight_region = [], []


def _weight_edge_gradients(frontier: list[_Frontier]) -> list[tuple[Node, int, Tensor]]:
    """Run every frontier node on its kept gradient for its weight-side outputs only: (child, input, gradient).

    Built-in nodes are called directly, inside a pre-hook of a one-node
    graph task whose targets are the frontier's weight-region slots: a
    node's backward asks the running graph task which of its outputs are
    needed, and the task knows only those slots, so no input-side output
    is computed and no node below runs. A custom ``autograd.Function``'s
    node cannot be called from Python; see :func:`_function_node_outputs`.
    One entry per edge, not summed: a directly called node's output is raw
    (a bias gradient not yet summed over rows, in the layer's batch shape)
    until the engine reduces it to its slot's shape.
    """
    seeds: list[tuple[Node, int, Tensor]] = []
    work = [(node, kept, edges) for node, kept, edges in frontier if kept is not None and any(g is not None for g in kept)]
    built_in = [item for item in work if not isinstance(item[0], torch._C._FunctionBase)]
    for node, kept, edges in work:
        if isinstance(node, torch._C._FunctionBase):
            outputs = _function_node_outputs(node, kept, edges)
            seeds.extend((child, k, outputs[j]) for j, (child, k) in edges if outputs[j] is not None)
    if not built_in:
        return seeds

    def call_frontier(_: Any) -> None:
        with torch.no_grad():
            for node, kept, edges in built_in:
                outputs = node(*kept)
                outputs = (outputs,) if isinstance(outputs, Tensor) else outputs
                seeds.extend((child, k, outputs[j]) for j, (child, k) in edges if outputs[j] is not None)

    host = torch.zeros((), requires_grad=True)
    with torch.enable_grad():
        root = host.view_as(host)
    handle = root.grad_fn.register_prehook(call_frontier)
    try:
        slots = {slot: None for _, _, edges in built_in for _, slot in edges}
        torch.autograd.grad(  # the host leaf is a target too, so the engine runs the root node and its hook
            [root], [GradientEdge(node, k) for node, k in slots] + [host], [torch.ones(())], allow_unused=True
        )
    finally:
        handle.remove()
    return seeds


class _Stop(Exception):
    """Raised by a post-hook to end an engine call as soon as the node it watches has run."""


def _function_node_outputs(
    node: Node, kept: tuple[Tensor | None, ...], edges: list[tuple[int, _Slot]]
) -> tuple[Tensor | None, ...]:
    """A custom ``autograd.Function`` frontier node's outputs, one per edge, from an engine call stopped after it.

    The engine runs the node (its ``backward`` computes what
    ``ctx.needs_input_grad`` says, fixed at forward time, so here the
    input-side outputs too), a post-hook reads its outputs and raises, and
    nothing below runs: with the weight-side children as targets the
    engine could otherwise walk an input-side child down to a shared
    parameter's other use.
    """
    result: list[tuple[Tensor | None, ...]] = []

    def read_and_stop(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]) -> None:
        result.append(tuple(grad_inputs))
        raise _Stop

    handle = node.register_hook(read_and_stop)
    defined = [(k, g) for k, g in enumerate(kept) if g is not None]
    slots = {slot: None for _, slot in edges}
    try:
        torch.autograd.grad(
            [GradientEdge(node, k) for k, _ in defined], [GradientEdge(child, k) for child, k in slots],
            [g for _, g in defined], retain_graph=True, allow_unused=True,
        )
    except _Stop:
        pass
    finally:
        handle.remove()
    return result[0]


class _Split:
    """Where B ends and W begins in the graph below ``root_edges``.

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
    first.
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
        self.param_nodes: dict[Node, Tensor] = {}
        self.input_path: set[Node] = set()
        self.reaches_param: set[Node] = set()
        for node in order:
            kids = [c for c, _ in children[node] if c is not None]
            if not kids:
                if isinstance(node, _ACCUMULATE_GRAD) and (
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
        self.frontier: dict[Node, list[tuple[int, _Slot]]] = {}
        for node in reversed(order):
            if node in self.input_path:
                edges = [(j, (c, k)) for j, (c, k) in enumerate(children[node]) if c in self.weight_region]
                if edges:
                    self.frontier[node] = edges


def _check_roots(
    roots: Sequence[Tensor], grad_roots: Sequence[Tensor | None] | None
) -> tuple[list[GradientEdge], list[Tensor]]:
    """Roots as graph edges and their gradients (ones for a scalar root without one)."""
    if isinstance(roots, Tensor):
        raise TypeError("roots must be a sequence of tensors, e.g. [loss] or list(outputs); got a single Tensor")
    if grad_roots is None:
        grad_roots = [None] * len(roots)
    if len(grad_roots) != len(roots):
        raise ValueError(f"grad_roots has {len(grad_roots)} entries for {len(roots)} roots: give one per root "
                         "(None for a scalar loss)")
    edges, grads = [], []
    for i, (root, grad) in enumerate(zip(roots, grad_roots)):
        if not isinstance(root, Tensor):
            raise TypeError(f"roots[{i}] is a {type(root).__name__}, not a Tensor")
        if not root.requires_grad:
            raise ValueError(f"roots[{i}] does not require grad (no grad_fn): pass only outputs that carry gradient")
        if grad is None:
            if root.numel() != 1:
                raise ValueError(f"grad_roots[{i}] is None but roots[{i}] has shape {tuple(root.shape)}: a gradient "
                                 "of ones is implied only for a scalar root; pass the output's gradient")
            grad = torch.ones_like(root, memory_format=torch.preserve_format)
        edges.append(get_gradient_edge(root))
        grads.append(grad)
    return edges, grads


def _check_parameters(parameters: Iterable[Tensor]) -> list[Tensor]:
    """The parameters that require grad, once each; a non-leaf is an error (it has no ``.grad`` of its own)."""
    if isinstance(parameters, Tensor):
        raise TypeError("parameters must be an iterable of tensors, e.g. module.parameters(); got a single Tensor")
    params: dict[int, Tensor] = {}
    for i, p in enumerate(parameters):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters[{i}] is a {type(p).__name__}, not a Tensor")
        if not p.requires_grad:
            continue  # frozen: a plain backward leaves it alone too
        if p.grad_fn is not None:
            raise ValueError(f"parameters[{i}] is not a leaf (grad_fn {p.grad_fn.name()}): pass the module's "
                             "parameters, not tensors computed from them")
        params.setdefault(id(p), p)
    return list(params.values())


def _capture(store: list[Any], index: int, grad_outputs: tuple[Tensor | None, ...]) -> None:
    """Pre-hook of frontier node ``index`` during B: keep the gradient it receives (the engine's sum)."""
    store[index] = tuple(grad_outputs)
