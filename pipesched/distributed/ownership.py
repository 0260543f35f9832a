"""Which stages this process builds, decided once when the pipeline is built.

Each process is one rank of the plan and keeps only the stages its
schedule's placement gives it. Two forms reach the same answer by different
checks: the full ``nn.Sequential`` (split by ``balance``; every rank sees
every skip route and every tied weight, and remembers which of the model's
layers it owns, so its state dict uses the model's own keys), or a dict of
just this rank's stages with ``num_stages`` (for models that do not fit on
one host; then no rank can know another's skip routes or ties, so they are
refused). This is construction, not the step:
:class:`~pipesched.distributed.DistributedPipeline` takes the answer and
keeps its own code to the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from pipesched.distributed.tied import TiedGroups
from pipesched.plan.schedule import Schedule, validate_placement
from pipesched.runtime.partition import (
    check_balance,
    check_shared_parameters,
    even_balance,
    split_module,
)
from pipesched.runtime.skip.layout import SkipLayout, inspect_skip_layout
from pipesched.runtime.skip.skippable import verify_skippables


@dataclass
class Ownership:
    """This rank's stages, and with a full ``nn.Sequential`` also which of the model's layers it owns.

    ``layer_stage`` (layer name -> stage, this rank's layers) and
    ``foreign_layers`` (the other ranks' layer names) let the state dict use
    the model's own keys; both stay empty with a dict of stages.
    """

    num_stages: int
    placement: list[int]
    stages: dict[int, nn.Module]  # this rank's stages, by index
    skips: SkipLayout
    tied: TiedGroups | None = None
    layer_stage: dict[str, int] = field(default_factory=dict)
    foreign_layers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StageLayout:
    """How the model is cut and placed: what every rank must agree on (``balance`` is ``None`` with a
    dict of stages, whose layers no rank sees)."""

    balance: tuple[int, ...] | None
    num_stages: int
    placement: tuple[int, ...]


def stage_layout(module: Any, balance: Any, num_stages: Any, schedule: Schedule, rank: int,
                 num_ranks: int) -> StageLayout:
    """The layout ``module`` and the arguments give, with every check that needs no other rank.

    No collective runs here, so a bad argument on one rank raises there
    before the ranks agree on their options (which then reports it to every
    rank instead of leaving them waiting in a collective).
    """
    if isinstance(module, nn.Sequential):
        verify_skippables(module)
        if balance is not None:
            balance = check_balance(balance, len(module))
        else:
            balance = even_balance(len(module), schedule.default_num_stages(num_ranks))
        placement = validate_placement(schedule.placement(len(balance), num_ranks), len(balance), num_ranks)
        return StageLayout(tuple(balance), len(balance), tuple(placement))
    if isinstance(module, Mapping):
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"with a dict of stages, num_stages must be an int >= 1, got {num_stages!r}")
        placement = validate_placement(schedule.placement(num_stages, num_ranks), num_stages, num_ranks)
        mine = {s for s in range(num_stages) if placement[s] == rank}
        if set(module) != mine:
            raise ValueError(
                f"rank {rank} must hold exactly stages {sorted(mine)} under schedule "
                f"{schedule.name!r} (placement {placement}), got {sorted(module)}"
            )
        for s, stage in module.items():
            if not isinstance(stage, nn.Module):
                raise TypeError(f"stage {s} must be an nn.Module, got {type(stage).__name__}")
        # routes within this rank's stages only: one to another rank's stage would need its edges
        skips = inspect_skip_layout([module.get(s) for s in range(num_stages)], complete=False)
        if skips.edges:
            raise ValueError(
                f"stages {[(e.src, e.dst) for e in skips.edges]} of this rank are linked by skip "
                f"connections, which every rank must know of: pass the full nn.Sequential instead of a dict"
            )
        return StageLayout(None, num_stages, tuple(placement))
    raise TypeError(
        f"module must be an nn.Sequential or a dict {{stage: nn.Module}}, got {type(module).__name__}"
    )


def own_stages(module: Any, layout: StageLayout, rank: int, group: Any,
               global_rank: Callable[[int], int]) -> Ownership:
    """This rank's stages of ``module`` (a full ``nn.Sequential`` or a dict of this rank's stages),
    cut and placed as ``layout`` (:func:`stage_layout`, agreed by every rank) says.

    ``global_rank`` maps a rank of ``group`` to its rank in the world (the
    tied weights' process groups are made of world ranks).
    """
    num_stages, placement = layout.num_stages, list(layout.placement)
    if layout.balance is not None:
        stages = split_module(module, list(layout.balance))
        check_shared_parameters(stages, placement, None)
        skips = inspect_skip_layout(stages)  # every rank sees every route: the same plan edges
        tied = TiedGroups(stages, placement, rank, group, global_rank)
        own = {s: stages[s] for s in range(num_stages) if placement[s] == rank}
        layer_stage = {name: s for s, stage in own.items() for name in stage._modules}
        foreign_layers = frozenset(module._modules) - set(layer_stage)
        return Ownership(num_stages, placement, own, skips, tied, layer_stage, foreign_layers)
    skips = inspect_skip_layout([module.get(s) for s in range(num_stages)], complete=False)  # no edges: checked
    return Ownership(num_stages, placement, dict(module), skips)
