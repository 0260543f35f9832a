"""Who hands what to whom: every data dependency of a plan, derived once.

A plan only orders actions; what flows between them is implied by the one
dependency rule, :func:`inputs_of`. A *lowering* applies that rule to a
whole plan once and lists every transfer with its producing and consuming
rank, in the order the producer makes them. Everything that moves data or
reasons about waiting reads this one answer:

* the single-process mailbox makes one slot per transfer;
* the multi-process communicator sends and receives, per pair of ranks,
  exactly :meth:`Lowering.messages`, in that order (no handshake needed);
* the simulator and plan validation replay the same edges;
* the watchdog names, for a stuck action, the transfers it still waits for.

A new kind of action or edge is a change to :func:`inputs_of` and nothing
else; the split backward (W actions) was one, skip connections another.

::

    F(s-1,m) ──activation──► F(s,m) ──state──► B(s,m) ◄──gradient── B(s+1,m)
                                                  │
                                                  └──state──► W(s,m)    (when the plan splits it)

``state`` edges stay on the stage's own rank (what a forward keeps for its
backward); ``activation`` and ``gradient`` edges cross a stage boundary and
are *transfers*, between ranks or within one.

Skip connections (:class:`SkipEdge`: tensors stashed on stage ``a``, popped
on stage ``b > a``) add two transfers per micro-batch, straight between the
two stages' ranks, never through the stages in between::

    F(a,m) ──skip──► F(b,m)        B(b,m) ──skip-gradient──► B(a,m)

Both are implied by the chain already (``F(a,m)`` precedes ``F(b-1,m)``,
``B(b,m)`` precedes ``B(a+1,m)``), so they add no ordering a valid plan
lacks; what they add is data that travels around the stages in between.
The skip edges are plain data (stage pairs and names), given by the runtime
that inspected the model, so this layer stays torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipesched.plan.action import Action

#: What an edge carries: a stage's output, an input gradient, or what a stage keeps for itself.
ACTIVATION, GRADIENT, STATE = "activation", "gradient", "state"
#: What a skip connection's edges carry: the stashed tensors, and their gradients back.
SKIP, SKIP_GRADIENT = "skip", "skip-gradient"


@dataclass(frozen=True, slots=True)
class SkipEdge:
    """Tensors stashed on stage ``src`` and popped on stage ``dst`` (``src < dst``), in ``names`` order.

    One per pair of stages: every name stashed on ``src`` and popped on
    ``dst`` travels in the same message. ``names`` label them (errors,
    charts); their order is the order of the tensors in that message.
    """

    src: int
    dst: int
    names: tuple[str, ...] = ()


#: The skip connections of a model cut into stages, as :func:`check_skips` returns them.
Skips = tuple[SkipEdge, ...]


def check_skips(skips: Sequence[SkipEdge], num_stages: int) -> Skips:
    """``skips`` checked against ``num_stages`` and sorted by stage pair; ``ValueError`` says what is wrong."""
    if isinstance(skips, SkipEdge) or not isinstance(skips, Sequence):
        raise ValueError(f"skips must be a sequence of SkipEdge, got {skips!r}")
    seen: set[tuple[int, int]] = set()
    for skip in skips:
        if not isinstance(skip, SkipEdge):
            raise ValueError(f"skips holds {skip!r}; expected SkipEdge(src, dst, names)")
        if not (isinstance(skip.src, int) and isinstance(skip.dst, int) and 0 <= skip.src < skip.dst < num_stages):
            raise ValueError(
                f"{skip}: a skip connection goes from a stage to a later one, 0 <= src < dst < {num_stages}; "
                f"a stash popped on its own stage needs no edge"
            )
        if (skip.src, skip.dst) in seen:
            raise ValueError(f"two skip edges from stage {skip.src} to stage {skip.dst}: give one with all their names")
        seen.add((skip.src, skip.dst))
    return tuple(sorted(skips, key=lambda k: (k.src, k.dst)))


@dataclass(frozen=True, slots=True)
class Edge:
    """``consumer`` needs what ``producer`` made; ``skip`` names the skip connection it belongs to."""

    producer: Action
    consumer: Action
    carries: str
    skip: SkipEdge | None = None

    @property
    def is_transfer(self) -> bool:
        """Whether the value crosses a stage boundary (and so may cross ranks)."""
        return self.carries != STATE


def inputs_of(action: Action, num_stages: int, skips: Skips = ()) -> tuple[Edge, ...]:
    """The dependency rule: the edges into ``action`` (the one place it is written).

    ``F(s, m)`` needs ``F(s-1, m)``'s output. ``B(s, m)`` needs what its own
    ``F(s, m)`` kept (the saved activations, or the input to recompute from)
    and ``B(s+1, m)``'s input gradient; the last stage's backward starts from
    the loss, computed as part of ``F(last, m)``. ``W(s, m)``, present when the
    plan splits that backward, needs what ``B(s, m)`` kept (the output
    gradient and the saved activations), on the same rank, and nothing else:
    no other stage waits for a W, which is why W can fill bubbles.

    A skip connection (``skips``, see :class:`SkipEdge`) from stage ``a`` to
    stage ``b`` adds ``F(a, m) → F(b, m)`` (the stashed tensors) and
    ``B(b, m) → B(a, m)`` (their gradients: the input gradient of the skip,
    which a split ``B(b, m)`` computes like any input gradient).
    """
    s, m = action.stage, action.microbatch
    if action.kind == "F":
        edges = (Edge(Action("F", s - 1, m), action, ACTIVATION),) if s > 0 else ()
        if skips:
            edges += tuple(Edge(Action("F", k.src, m), action, SKIP, k) for k in skips if k.dst == s)
        return edges
    if action.kind == "W":
        return (Edge(Action("B", s, m), action, STATE),)
    own = Edge(Action("F", s, m), action, STATE)
    edges = (own, Edge(Action("B", s + 1, m), action, GRADIENT)) if s + 1 < num_stages else (own,)
    if skips:
        edges += tuple(Edge(Action("B", k.dst, m), action, SKIP_GRADIENT, k) for k in skips if k.src == s)
    return edges


def dependencies(action: Action, num_stages: int, skips: Skips = ()) -> tuple[Action, ...]:
    """The actions whose results ``action`` consumes (the producers of :func:`inputs_of`)."""
    return tuple(edge.producer for edge in inputs_of(action, num_stages, skips))


@dataclass(frozen=True, slots=True)
class Transfer:
    """One value crossing a stage boundary: ``edge``, from rank ``src`` to rank ``dst``."""

    edge: Edge
    src: int
    dst: int

    @property
    def producer(self) -> Action:
        return self.edge.producer

    @property
    def consumer(self) -> Action:
        return self.edge.consumer

    @property
    def carries(self) -> str:
        return self.edge.carries

    @property
    def crosses_ranks(self) -> bool:
        return self.src != self.dst


class Lowering:
    """Every transfer of one plan, indexed by consuming action, producing action and rank pair.

    ``plan[r]`` is rank r's ordered action list. The plan must be complete
    (every producer present), which :func:`~pipesched.plan.schedule.validate_plan`
    checks; a missing producer raises ``KeyError`` naming it. ``skips``: the
    model's skip connections (:class:`SkipEdge`), checked by :func:`check_skips`.
    """

    def __init__(self, plan: Sequence[Sequence[Action]], num_stages: int, skips: Sequence[SkipEdge] = ()):
        self.num_stages = num_stages
        self.skips: Skips = check_skips(skips, num_stages)
        self.num_ranks = len(plan)
        self.num_microbatches = 1 + max((a.microbatch for actions in plan for a in actions), default=-1)
        self.rank_of: dict[Action, int] = {a: r for r, actions in enumerate(plan) for a in actions}
        self._into: dict[Action, tuple[Transfer, ...]] = {}
        self._out_of: dict[Action, list[Transfer]] = {}
        for rank, actions in enumerate(plan):
            for action in actions:
                incoming = []
                for edge in inputs_of(action, num_stages, self.skips):
                    if not edge.is_transfer:
                        continue
                    if edge.producer not in self.rank_of:
                        raise KeyError(f"{action} needs {edge.producer}, which is not in the plan")
                    transfer = Transfer(edge, self.rank_of[edge.producer], rank)
                    incoming.append(transfer)
                    self._out_of.setdefault(edge.producer, []).append(transfer)
                self._into[action] = tuple(incoming)
        #: every transfer, in production order on each producing rank (ranks in order)
        self.transfers: tuple[Transfer, ...] = tuple(
            t for actions in plan for action in actions for t in self._out_of.get(action, ())
        )

    def receives(self, action: Action) -> tuple[Transfer, ...]:
        """The transfers ``action`` consumes (none for a first stage's forward)."""
        return self._into.get(action, ())

    def sends(self, action: Action) -> tuple[Transfer, ...]:
        """The transfers ``action`` produces (none for a last stage's forward)."""
        return tuple(self._out_of.get(action, ()))

    def messages(self, src: int, dst: int) -> list[Transfer]:
        """What rank ``src`` sends rank ``dst`` (``src != dst``), in ``src``'s production order."""
        return [t for t in self.transfers if t.src == src and t.dst == dst and src != dst]

    def splits(self, stage: int, microbatch: int) -> bool:
        """Whether the plan splits (stage, micro-batch)'s backward: it holds ``W(stage, microbatch)``."""
        return Action("W", stage, microbatch) in self.rank_of

    def dependencies(self, action: Action) -> tuple[Action, ...]:
        return dependencies(action, self.num_stages, self.skips)
