"""Which stage stashes and which stage pops each skip tensor, read from the model once.

The pipeline cuts the model into stages, then inspects their layers in
order: every ``(namespace, name)`` a layer of stage ``a`` stashes and a later
layer of stage ``b`` pops is a *route* ``a → b``. Routes within one stage
stay inside that stage's forward; routes between stages become the plan's
skip edges (:class:`~pipesched.plan.lowering.SkipEdge`, plain data): one per
pair of stages, carrying all its names in one message, in an order every
process derives alike (the stashing layer's position, then the name: a
namespace's random id would differ between processes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from pipesched.plan.lowering import SkipEdge
from pipesched.runtime.skip.skippable import Skippable
from pipesched.runtime.skip.tracker import SkipKey


@dataclass(frozen=True)
class SkipLayout:
    """The skip routes of a pipeline's stages.

    ``routes[key] = (src, dst)``; ``edges`` the routes between stages as plan
    data; ``keys[edge]`` the full names an edge carries, in message order;
    ``stages`` the stages that hold a skippable layer (their forwards run
    with a stage tracker).
    """

    routes: dict[SkipKey, tuple[int, int]] = field(default_factory=dict)
    edges: tuple[SkipEdge, ...] = ()
    keys: dict[SkipEdge, tuple[SkipKey, ...]] = field(default_factory=dict)
    stages: frozenset[int] = frozenset()

    @property
    def empty(self) -> bool:
        """No skippable layer anywhere: the engine skips all skip handling."""
        return not self.stages

    def outgoing(self, stage: int) -> tuple[SkipEdge, ...]:
        """The edges whose tensors ``stage`` stashes."""
        return tuple(edge for edge in self.edges if edge.src == stage)


def inspect_skip_layout(stages: Sequence[nn.Module | None], *, complete: bool = True) -> SkipLayout:
    """The routes of ``stages`` (``None``: a stage another process holds, skipped).

    With ``complete``, every stash must have its pop and every pop its stash
    (``verify_skippables`` on the whole model checks the same, with the
    layers' names); a stage list missing some stages (``complete=False``)
    refuses instead a route it cannot see both ends of, since its tensors
    would have nowhere to go.
    """
    stashed_at: dict[SkipKey, tuple[int, int]] = {}  # key -> (stage, position of the stashing layer)
    routes: dict[SkipKey, tuple[int, int]] = {}
    order: dict[SkipKey, tuple[int, str]] = {}
    with_skippables: set[int] = set()
    position = 0
    for index, stage in enumerate(stages):
        if stage is None:
            continue
        for layer in stage._modules.values() if not isinstance(stage, Skippable) else (stage,):
            position += 1
            if not isinstance(layer, Skippable):
                continue
            with_skippables.add(index)
            for key in layer.poppable():
                if key[1] in layer.stashable_names:
                    continue
                if key not in stashed_at:
                    raise ValueError(
                        f"stage {index} pops '{key[1]}', which no earlier stage of this process stashes; "
                        + ("stash it before popping it (pipesched.skip.verify_skippables checks a model)" if complete
                           else "skip connections across processes need the full nn.Sequential on every rank")
                    )
                src, at = stashed_at.pop(key)
                routes[key] = (src, index)
                order[key] = (at, key[1])
            for key in layer.stashable():
                stashed_at[key] = (index, position)
    if stashed_at:
        key, (src, _) = next(iter(stashed_at.items()))
        raise ValueError(
            f"stage {src} stashes '{key[1]}', which no later stage of this process pops; "
            + ("pop it after stashing it (pipesched.skip.verify_skippables checks a model)" if complete
               else "skip connections across processes need the full nn.Sequential on every rank")
        )
    pairs: dict[tuple[int, int], list[SkipKey]] = {}
    for key, (src, dst) in routes.items():
        if src != dst:
            pairs.setdefault((src, dst), []).append(key)
    keys: dict[SkipEdge, tuple[SkipKey, ...]] = {}
    for (src, dst), members in sorted(pairs.items()):
        ordered = tuple(sorted(members, key=order.__getitem__))
        keys[SkipEdge(src, dst, tuple(name for _, name in ordered))] = ordered
    return SkipLayout(routes, tuple(keys), keys, frozenset(with_skippables))
