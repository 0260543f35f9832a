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

A new kind of action or edge (skip connections, say) is a change to
:func:`inputs_of` and nothing else; the split backward (W actions) was one.

::

    F(s-1,m) ──activation──► F(s,m) ──state──► B(s,m) ◄──gradient── B(s+1,m)
                                                  │
                                                  └──state──► W(s,m)    (when the plan splits it)

``state`` edges stay on the stage's own rank (what a forward keeps for its
backward); ``activation`` and ``gradient`` edges cross a stage boundary and
are *transfers*, between ranks or within one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipesched.plan.action import Action

#: What an edge carries: a stage's output, an input gradient, or what a stage keeps for itself.
ACTIVATION, GRADIENT, STATE = "activation", "gradient", "state"


@dataclass(frozen=True, slots=True)
class Edge:
    """``consumer`` needs what ``producer`` made."""

    producer: Action
    consumer: Action
    carries: str

    @property
    def is_transfer(self) -> bool:
        """Whether the value crosses a stage boundary (and so may cross ranks)."""
        return self.carries != STATE


def inputs_of(action: Action, num_stages: int) -> tuple[Edge, ...]:
    """The dependency rule: the edges into ``action`` (the one place it is written).

    ``F(s, m)`` needs ``F(s-1, m)``'s output. ``B(s, m)`` needs what its own
    ``F(s, m)`` kept (the saved activations, or the input to recompute from)
    and ``B(s+1, m)``'s input gradient; the last stage's backward starts from
    the loss, computed as part of ``F(last, m)``. ``W(s, m)``, present when the
    plan splits that backward, needs what ``B(s, m)`` kept (the output
    gradient and the saved activations), on the same rank, and nothing else:
    no other stage waits for a W, which is why W can fill bubbles.
    """
    s, m = action.stage, action.microbatch
    if action.kind == "F":
        return (Edge(Action("F", s - 1, m), action, ACTIVATION),) if s > 0 else ()
    if action.kind == "W":
        return (Edge(Action("B", s, m), action, STATE),)
    own = Edge(Action("F", s, m), action, STATE)
    if s + 1 < num_stages:
        return (own, Edge(Action("B", s + 1, m), action, GRADIENT))
    return (own,)


def dependencies(action: Action, num_stages: int) -> tuple[Action, ...]:
    """The actions whose results ``action`` consumes (the producers of :func:`inputs_of`)."""
    return tuple(edge.producer for edge in inputs_of(action, num_stages))


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
    checks; a missing producer raises ``KeyError`` naming it.
    """

    def __init__(self, plan: Sequence[Sequence[Action]], num_stages: int):
        self.num_stages = num_stages
        self.num_ranks = len(plan)
        self.num_microbatches = 1 + max((a.microbatch for actions in plan for a in actions), default=-1)
        self.rank_of: dict[Action, int] = {a: r for r, actions in enumerate(plan) for a in actions}
        self._into: dict[Action, tuple[Transfer, ...]] = {}
        self._out_of: dict[Action, list[Transfer]] = {}
        for rank, actions in enumerate(plan):
            for action in actions:
                incoming = []
                for edge in inputs_of(action, num_stages):
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
        return dependencies(action, self.num_stages)
