"""A stage's backward in two halves: B (input gradients) now, W (parameter gradients) later.

Zero-bubble schedules run a stage's backward as two actions: ``B`` computes
only the gradient of the stage's *inputs* (what the previous stage waits
for), ``W`` only the gradients of its *parameters* (which nobody waits for,
so it fills a bubble). Each half must do only its own work: a W that re-ran
the whole backward would cost more than it saves.

How the graph is split (:mod:`pipesched.runtime.split_graph`): B runs the
*input path*, the nodes from which an input can be reached, with
``torch.autograd.grad`` from the roots to the inputs; the engine asks each
of them only for the gradients that lead to an input (an ``AddmmBackward``
computes ``dY @ W`` and skips ``X.T @ dY``). The *frontier* nodes, on the
input path with edges into the weight region, carry hooks during B
(:mod:`pipesched.runtime.frontier`) that keep their incoming gradient and
their outputs. B then releases the tensors saved by every input-path node
W will not call (a GELU's input, a dropout mask, a custom Function's saved
tensors). W calls each remaining (built-in) frontier node once more,
directly, for its weight-side outputs only, and runs one backward from
those, from the weight-side gradients B already had (a custom
``autograd.Function``'s node, a compiled stage's node: they compute their
weight side in B) and from any root that reaches no input (the first
stage's whole graph) into the parameters: ``AccumulateGrad`` accumulates
exactly as in a plain backward (into ``.grad``, summing every use, running
parameter hooks, leaving alone a parameter that gets no gradient).

No node runs twice for the same output, whatever the graph: a parameter
used by two layers on one path (a re-used layer, tied weights) gets both
uses' gradients in W, and a compiled stage's backward graph runs once per
micro-batch. Were a torch release to stop consulting the running graph task
in a directly called node, W would compute the frontier's input-side
outputs again and drop them: slower, still exact; the start-up self-check
(:mod:`pipesched.runtime.split_selfcheck`) warns if so.

``torch.distributed.pipelining``'s ``stage_backward_input`` /
``stage_backward_weight`` split at similar nodes; this module differs in
that W never re-runs the input path (torch's re-runs the path between two
uses of a shared parameter), the first stage's W does all of its weight
work, B frees what W does not need, and W makes two engine calls however
many layers the stage has (one per parameter group in torch's).

Hooks run once each, as in a plain backward, on the same gradients: module
full backward (pre-)hooks and tensor hooks (``register_hook``,
``retain_grad``) on activations in B; parameter hooks (``register_hook``,
post-accumulate-grad) in W. Two things cannot be split
(:mod:`pipesched.runtime.whole_backward`), and then B runs the stage's
*whole* backward (one plain engine call into every reachable leaf, as 1F1B
does) and W does nothing for it, with a warning once per stage and cause: a legacy ``Module.register_backward_hook`` in the stage (a post-hook
on the layer's last node that must see, and may rewrite, the input and the
weight gradients together) and a reentrant ``torch.utils.checkpoint``
(``use_reentrant=True``) region, whose backward calls the engine itself and
which torch refuses inside ``torch.autograd.grad``.

B keeps the graph (``retain_graph``) only when W will call a built-in
frontier node again: a compiled stage's backward with AOTAutograd's donated
buffers refuses a kept graph.

Limits: a post-hook put on a built-in frontier node itself
(``out.grad_fn.register_hook``) runs in B only, where that node's weight-side
outputs are ``None``: what it returns for them is lost, and node hooks
cannot be listed to detect it (the legacy module hook, which is one, is
found on its module). A custom Function's weight-side gradients (a compiled stage's: one
per parameter) are kept from B to W in place of its saved tensors, which B
releases; :meth:`WeightWork.nbytes` counts them. A compiled stage with graph
breaks (eager layers between its compiled graphs) has built-in frontier
nodes, so B keeps the graph, and a compiled graph with donated buffers then
raises torch's error (which names ``torch._functorch.config.donated_buffer =
False``). W calls the frontier nodes
on the calling thread's current CUDA stream, not the stream their forward
ran on (not tested on CUDA). The non-reentrant checkpoint
(``use_reentrant=False``) splits, but its saved tensors live under
saved-tensor hooks, which B does not release and :meth:`WeightWork.nbytes`
does not count (as for any saved-tensor hooks, e.g. CPU offload).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from pipesched.runtime.autograd_internals import is_python_node, run_engine
from pipesched.runtime.frontier import FrontierCapture, Seed, ToCall, weight_edge_gradients
from pipesched.runtime.saved_tensors import count_storage, release_saved, saved_tensors, storage_key
from pipesched.runtime.split_graph import SplitGraph
from pipesched.runtime.split_selfcheck import self_check
from pipesched.runtime.whole_backward import warn_once, whole_backward, why_whole

__all__ = ["WeightWork", "backward_input"]


def backward_input(
    roots: Sequence[Tensor],
    grad_roots: Sequence[Tensor | None] | None,
    inputs: Sequence[Tensor],
    parameters: Iterable[Tensor] | None = None,
    *,
    module: nn.Module | None = None,
    name: str = "the stage",
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
    ``inputs``' ``.grad`` is left as it was) and a :class:`WeightWork` whose
    ``run()`` later accumulates into the ``.grad`` of ``parameters`` what
    ``torch.autograd.backward(roots, grad_roots, inputs=parameters)`` would.
    Parameters that do not require grad are skipped. ``parameters=None``
    (what the engine passes): every leaf the roots reach that is not one of
    ``inputs`` (a loss's own parameters, a parameter of another stage that
    the loss reads), exactly the leaves a plain backward accumulates into,
    found in the graph rather than listed. The graph is consumed as by one
    plain backward: after W, backing through ``roots`` again fails.

    ``module`` (the stage's module) is searched for legacy backward hooks
    and ``name`` names the stage in warnings. When the backward cannot be
    split (see the module docstring), B runs it whole: every reachable leaf
    gets its gradient now, as in ``torch.autograd.backward(roots,
    grad_roots)``, and the returned W is empty.

    Inputs that require grad should be the stage's own leaves (the detached
    inputs the engine makes); a non-leaf input whose graph reaches one of
    ``parameters`` is rejected, because its gradient would have to flow past
    the stage boundary.
    """
    self_check()
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

    split = SplitGraph(root_edges, {e.node for e in input_edges.values()}, by_id)
    for i, edge in input_edges.items():
        if edge.node in split.reaches_param:
            raise ValueError(
                f"inputs[{i}] is not a leaf and its graph ({edge.node.name()}) reaches a parameter: its gradient "
                "would flow past the stage boundary; pass the stage's detached input (x.detach().requires_grad_())"
            )
    why = why_whole(split.reentrant, module)
    if why is not None:
        warn_once(name, why)
        return whole_backward(root_edges, root_grads, inputs, list(input_edges), name, why), WeightWork._empty()

    capture = FrontierCapture(split.frontier)
    seeds: list[Seed] = [(e.node, e.output_nr, g) for e, g in zip(root_edges, root_grads)
                         if e.node in split.weight_region]  # roots that reach no input
    needs_w = bool(split.frontier or seeds)
    # Only a built-in frontier node runs again (in W) after B ran it, so only it needs B to keep what it saved;
    # a compiled stage's node refuses a graph kept by retain_graph when it donates its buffers.
    keep = any(not is_python_node(node) for node in split.frontier)
    grads: Sequence[Tensor | None] = ()
    if input_edges:
        with capture:
            grads = torch.autograd.grad(
                root_edges, list(input_edges.values()), root_grads, retain_graph=keep, allow_unused=True
            )
    input_grads: list[Tensor | None] = [None] * len(inputs)
    for position, grad in zip(input_edges, grads):
        input_grads[position] = grad
    if not needs_w:
        return tuple(input_grads), WeightWork._empty()
    to_call, computed = capture.split()
    called = {node for node, _, _ in to_call}
    for node in split.input_path - called:  # B ran them, W will not
        release_saved(node)
    work = WeightWork(
        frontier=to_call,
        seeds=computed + seeds,
        parameters=list(split.param_nodes.values()),
        anchors=root_edges,
        weight_region=[node for node in split.order if node in split.weight_region],
        exclude=list(split.param_nodes.values()) if params is None else params,
    )
    return tuple(input_grads), work


class WeightWork:
    """W of one (stage, micro-batch): what parameter gradients still need, and nothing else.

    Holds the frontier nodes W calls with their kept incoming gradients,
    the seeds (gradients B already has for the weight region: a custom
    Function's weight side, roots that reach no input), and references to
    the roots' nodes (a custom autograd Function's node is owned by its
    parents, not by its Python object). The tensors it keeps alive are
    those, the tensors saved by the frontier nodes it calls and by the
    weight region: :meth:`nbytes` counts them.
    """

    def __init__(
        self,
        frontier: list[ToCall],
        seeds: list[Seed],
        parameters: list[Tensor],
        anchors: list[GradientEdge],
        weight_region: list[Node],
        exclude: Sequence[Tensor],
    ) -> None:
        self._frontier = frontier
        self._seeds = seeds
        self._parameters = parameters  # those the weight region leads to
        self._anchors = anchors
        self._weight_region = weight_region
        self._exclude = {storage_key(p) for p in exclude}
        self._nbytes: int | None = None
        self._state = "pending"  # -> "ran" | "released"

    @classmethod
    def _empty(cls) -> WeightWork:
        """The W of a stage whose parameters get no gradient now (none, none reached, or B did it): a no-op."""
        return cls([], [], [], [], [], [])

    @property
    def pending(self) -> bool:
        """True until :meth:`run` or :meth:`release`."""
        return self._state == "pending"

    @property
    def empty(self) -> bool:
        """True when there is no parameter gradient to compute (W would do nothing)."""
        return not (self._frontier or self._seeds)

    def nbytes(self) -> int:
        """Bytes W keeps alive until it runs: kept gradients and saved activations, each storage once.

        Counts the incoming gradients kept for the frontier nodes, the seeds'
        gradients, and the tensors saved by the nodes W will run; not the
        parameters' own storage. 0 once W has run or was released.
        """
        if self._state != "pending":
            return 0
        if self._nbytes is None:
            sizes: dict[tuple[Any, ...], int] = {}
            for _, kept, _ in self._frontier:
                for grad in kept or ():
                    count_storage(sizes, grad, self._exclude)
            for _, _, grad in self._seeds:
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
            seeds = weight_edge_gradients(self._frontier) + self._seeds
            if seeds and self._parameters:  # (an empty inputs tuple would mean every leaf)
                run_engine([GradientEdge(node, k) for node, k, _ in seeds], [g for _, _, g in seeds],
                           self._parameters)
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
        self._frontier, self._seeds, self._parameters = [], [], []
        self._anchors, self._weight_region = [], []


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
