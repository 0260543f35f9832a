"""Skip tensors in a pipeline step: received into a stage's inputs, sent from its outputs.

torchgpipe hid skip tensors in "portals", autograd functions that smuggle a
tensor past the stages in between and had to count how often a checkpointed
forward would read one. Here the engine already cuts autograd at every stage
boundary, so a skip connection is just one more boundary crossing, taken
straight from the stashing stage to the popping stage:

* on the popping stage ``b``, the received skip tensors become extra *inputs*
  of ``F(b, m)``: fresh leaves, like its activation. The checkpoint manager
  keeps them with the stage input, so a recompute pops the very same tensors
  again, and ``B(b, m)`` computes their gradients like any input gradient
  (also in a split backward), which go back to ``B(a, m)``;
* on the stashing stage ``a``, the stashed tensors are extra *outputs* of
  ``F(a, m)``: sent once, right after the first run, and kept with the
  forward's result (their autograd nodes; data the graph does not need is
  dropped as for any sent output). A recompute before ``B(a, m)`` stashes
  again, and the re-stashed tensors are the roots its backward starts from,
  seeded with the received gradients; nothing is sent twice, so a skip
  tensor crosses once per micro-batch whatever the checkpoint policy.

Random streams are per (stage, micro-batch), so a recompute that stashes a
dropout's output stashes exactly the tensor first sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from pipesched.plan.lowering import SkipEdge, Transfer
from pipesched.runtime.skip.layout import SkipLayout
from pipesched.runtime.skip.tracker import SkipKey, SkipTracker, use_skip_tracker
from pipesched.runtime.stage_input import stage_leaf
from pipesched.runtime.transport import Transport

#: Per skip edge, its tensors (or their gradients) in the edge's name order; ``None`` where absent.
SkipValues = dict[SkipEdge, tuple[Tensor | None, ...]]
#: A stage forward as the checkpoint manager runs it: inputs -> (output boundary, loss, stashed).
StageRun = Callable[[tuple[Tensor, ...]], tuple[Any, Tensor | None, SkipValues]]


class StageTracker(SkipTracker):
    """The tracker of one stage forward in a pipeline.

    A stash whose route leaves the stage is kept apart, to be sent; a pop is
    served from the stage's own stashes first (a route within the stage, or
    a name no route knows: a skippable nested inside a layer), then from the
    tensors received for it.
    """

    def __init__(self, layout: SkipLayout, stage: int, received: dict[SkipKey, Tensor | None]):
        super().__init__()
        self.layout = layout
        self.stage = stage
        self.received = received
        self.sent: dict[SkipKey, Tensor | None] = {}

    def save(self, key: SkipKey, tensor: Tensor | None) -> None:
        route = self.layout.routes.get(key)
        if route is not None and route[0] == self.stage and route[1] != self.stage:
            self.sent[key] = tensor
        else:
            self.tensors[key] = tensor

    def load(self, key: SkipKey) -> Tensor | None:
        if key in self.tensors:
            return self.tensors.pop(key)
        return self.received.pop(key)

    def outgoing(self) -> SkipValues:
        return {edge: tuple(self.sent[key] for key in self.layout.keys[edge])
                for edge in self.layout.outgoing(self.stage)}


def partition(pairs: Sequence[tuple[Transfer, Any]]) -> tuple[list[tuple[Transfer, Any]], list[tuple[Transfer, Any]]]:
    """``(transfer, slot)`` pairs split into the stage-boundary ones and the skip ones."""
    main = [pair for pair in pairs if pair[0].edge.skip is None]
    return main, [pair for pair in pairs if pair[0].edge.skip is not None]


def payload(transfer: Transfer, main: tuple[Tensor | None, ...], skips: SkipValues) -> tuple[Tensor | None, ...]:
    """What ``transfer`` carries: ``main`` (activation or input gradient), or its skip edge's values."""
    return main if transfer.edge.skip is None else skips[transfer.edge.skip]


class StepSkips:
    """The skip connections of one step, for the ranks of this process.

    Each worker touches only the entries of its own (stage, micro-batch)
    pairs, so no lock is needed. An entry lives from ``F(b, m)`` to
    ``B(b, m)`` and holds positions only, never a tensor: received skip
    tensors live in the checkpoint manager's stage inputs, and die with them.
    """

    def __init__(self, layout: SkipLayout, transport: Transport):
        self.layout = layout
        self.transport = transport
        #: (stage, micro-batch) -> (count of boundary inputs, per received edge the input index of each name)
        self._inputs: dict[tuple[int, int], tuple[int, list[tuple[SkipEdge, tuple[int | None, ...]]]]] = {}

    def forward(
        self, stage: int, microbatch: int, rank: int, leaves: tuple[Tensor, ...],
        run: Callable[[tuple[Tensor, ...]], tuple[Any, Tensor | None, SkipValues]],
        incoming: Sequence[tuple[Transfer, Any]], keep: bool,
    ) -> tuple[tuple[Tensor, ...], StageRun]:
        """``F(stage, m)``'s inputs with the received skip tensors appended, and its forward under a tracker.

        The returned run pops from the inputs it is given (the first run's,
        or a recompute's fresh leaves of the same tensors) and returns the
        tensors the stage stashes for later stages.
        """
        if stage not in self.layout.stages:
            return leaves, run
        count = len(leaves)
        extra: list[Tensor] = []
        received: list[tuple[SkipEdge, tuple[int | None, ...]]] = []
        for transfer, slot in incoming:
            packet, _ = slot.get()
            positions = []
            for value in self.transport.receive(packet, rank):
                positions.append(None if value is None else count + len(extra))
                if value is not None:
                    extra.append(stage_leaf(value, keep))
            received.append((transfer.edge.skip, tuple(positions)))  # type: ignore[arg-type]
        if received:
            self._inputs[(stage, microbatch)] = (count, received)
        layout = self.layout
        named = [(key, at) for edge, positions in received for key, at in zip(layout.keys[edge], positions)]

        def tracked(inputs: tuple[Tensor, ...]) -> tuple[Any, Tensor | None, SkipValues]:
            tracker = StageTracker(layout, stage, {key: None if at is None else inputs[at] for key, at in named})
            with use_skip_tracker(tracker):
                out, loss, _ = run(inputs[:count])
            return out, loss, tracker.outgoing()

        return leaves + tuple(extra), tracked

    def backward_roots(
        self, rank: int, stashed: SkipValues, incoming: Sequence[tuple[Transfer, Any]]
    ) -> tuple[list[Tensor], list[Tensor], float]:
        """``B(a, m)``'s extra roots: each stashed tensor with the gradient its popping stage sent back.

        Also returns when the last of those gradients arrived (``perf_counter``).
        """
        roots: list[Tensor] = []
        grads: list[Tensor] = []
        arrived = 0.0
        for transfer, slot in incoming:
            packet, _ = slot.get()
            arrived = max(arrived, slot.filled_at)
            for tensor, grad in zip(stashed[transfer.edge.skip], self.transport.receive(packet, rank)):  # type: ignore[index]
                if tensor is not None and grad is not None and tensor.requires_grad:
                    roots.append(tensor)
                    grads.append(grad)
        return roots, grads, arrived

    def split_input_grads(
        self, stage: int, microbatch: int, input_grads: tuple[Tensor | None, ...]
    ) -> tuple[tuple[Tensor | None, ...], SkipValues]:
        """``B(b, m)``'s input gradients as (the boundary's, the received skip tensors' per edge)."""
        entry = self._inputs.pop((stage, microbatch), None)
        if entry is None:
            return input_grads, {}
        count, received = entry
        return input_grads[:count], {
            edge: tuple(None if at is None else input_grads[at] for at in positions) for edge, positions in received
        }
