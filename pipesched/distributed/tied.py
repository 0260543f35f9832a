"""Tied weights across processes: each holds a copy; their gradients are summed after every backward.

A parameter used by stages on different ranks (a language model's embedding
on the first rank and its output head on the last) exists once per process.
As Megatron-LM does with its embedding group, the copies are kept identical
rather than shared:

* when the pipeline is built, the lowest rank holding the parameter
  broadcasts its value to the others that hold it (models initialised with
  different seeds start equal);
* after each successful step's backward, the holders all-reduce (sum) the
  parameter's gradient among themselves, so every copy's ``.grad`` is the
  whole model's gradient, exactly what the un-pipelined model accumulates;
* the optimizer of each process holds its own copy (``pipe.parameters()``);
  identical gradients and identical optimizer steps keep the copies
  identical, so no refresh is needed before the next step.

Only the full-``nn.Sequential`` form can find ties (every process sees the
whole model); a dict of this rank's stages shows no other rank's tensors.
Each set of holders gets its own process group (every process of the world
enters its creation, in one order), and groups are reduced in one global
order, so overlapping groups cannot deadlock. When the pipeline runs on a
process group smaller than the world, subgroups cannot be created without
the other processes, so the reduction runs over the pipeline's group with
non-holders adding zeros. Parameters held by the same ranks travel in one
buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipesched.runtime.host_buffer import refuse_sparse_gradients, through_host


class TiedGroups:
    """The parameters of this rank's stages that other ranks' stages use too, grouped by holders."""

    def __init__(self, stages: Sequence[nn.Module], placement: Sequence[int], rank: int, group: Any,
                 global_rank: Callable[[int], int]):
        holders: dict[int, tuple[nn.Parameter, set[int]]] = {}
        for index, stage in enumerate(stages):  # every process walks the same model in the same order
            for _, param in stage.named_parameters(remove_duplicate=False):
                holders.setdefault(id(param), (param, set()))[1].add(placement[index])
        by_ranks: dict[tuple[tuple[int, ...], torch.dtype], list[nn.Parameter]] = {}
        for param, ranks in holders.values():
            if len(ranks) > 1:  # one buffer per holders and dtype
                by_ranks.setdefault((tuple(sorted(ranks)), param.dtype), []).append(param)
        tied = {id(p) for params in by_ranks.values() for p in params}
        refuse_sparse_gradients(stages, "the tied-weight all-reduce", tied)  # before any group is created
        size = dist.get_world_size(group)
        whole_world = size == dist.get_world_size()
        #: (process group, global rank of the lowest holder, the parameters, whether this rank holds
        #: them), in one global order
        self.groups: list[tuple[Any, int, list[nn.Parameter], bool]] = []
        #: id of a parameter as built -> (this rank's stage module, its name there), see :meth:`locate`
        self._where: dict[int, tuple[nn.Module, str]] = {}
        for (ranks, _), params in by_ranks.items():
            members = [global_rank(r) for r in ranks]
            if len(ranks) == size:
                pg = group
            elif whole_world:  # every process takes part in creating each group, in this order
                pg = _subgroup(tuple(members))
            else:
                # processes outside the pipeline's group could not take part in creating a
                # subgroup: reduce over the pipeline's group, non-holders adding zeros
                pg = group
            if rank in ranks or pg is group:
                self.groups.append((pg, members[0], params, rank in ranks))

    def __bool__(self) -> bool:
        return bool(self.groups)

    def locate(self, stages: dict[int, nn.Module]) -> None:
        """Find each tied parameter by its name in this rank's ``stages`` from now on, not by the object.

        FSDP2 (``fully_shard``, ``replicate``) replaces a module's parameters:
        sharded ``DTensor`` ones between steps, unsharded ones while gathered
        for a step. Call this before handing the stages to it; the reductions
        then act on whatever the stage holds under that name. A parameter two
        of this rank's stages share would be two FSDP units' at once, which
        FSDP2 cannot do: refused.
        """
        tied = {id(p) for _, _, params, holds in self.groups if holds for p in params}
        for index, stage in sorted(stages.items()):
            for name, param in stage.named_parameters(remove_duplicate=False):
                if id(param) not in tied:
                    continue
                if id(param) in self._where and self._where[id(param)][0] is not stage:
                    raise NotImplementedError(
                        f"parameter {name!r} of stage {index} is shared with another stage of the same rank; "
                        "FSDP2 cannot shard one parameter in two stages: use a schedule with one stage per "
                        "rank (gpipe, 1f1b, zb-h1), or group=/data_parallel_group=")
                self._where.setdefault(id(param), (stage, name))
        # keep no reference to the parameters as built: FSDP2 copied them into its shards, and holding
        # the originals would keep every tied weight whole in memory; a meta stand-in names each one
        for position, (pg, lowest, params, holds) in enumerate(self.groups):
            if holds:
                stand_ins = [self._stand_in(p) if id(p) in self._where else p for p in params]
                self.groups[position] = (pg, lowest, stand_ins, holds)

    def _stand_in(self, param: nn.Parameter) -> nn.Parameter:
        """A meta-device parameter shaped like ``param``, found by :meth:`_now` where ``param`` was."""
        stand_in = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        self._where[id(stand_in)] = self._where.pop(id(param))
        return stand_in

    def _now(self, param: nn.Parameter) -> nn.Parameter:
        """``param`` as this rank's stage holds it now (see :meth:`locate`)."""
        where = self._where.get(id(param))
        return param if where is None else where[0].get_parameter(where[1])

    def counted_elsewhere(self, global_rank: int) -> set[int]:
        """Ids of this process's tied parameters whose lowest holder is another process.

        Every holder has the same summed gradient, so a whole-model sum over
        parameters (a gradient norm) counts each tied weight once, at its
        lowest holder.
        """
        return {id(self._now(p)) for _, lowest, params, holds in self.groups if holds and lowest != global_rank
                for p in params}

    @torch.no_grad()
    def broadcast_values(self) -> None:
        """Make every holder's copy the lowest holder's value."""
        for pg, source, params, _ in self.groups:
            through_host(params, partial(dist.broadcast, src=source, group=pg), [p.data for p in params])

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum each tied parameter's gradient over its holders (a missing ``.grad`` counts as zeros).

        Call it between the backward and the optimizer step, on every rank of the pipeline.
        """
        for pg, _, every, holds in self.groups:
            params = [self._now(p) for p in every if p.requires_grad]  # the same on every holder: one model
            if not params:
                continue
            grads = [p.grad if holds and p.grad is not None else torch.zeros_like(p) for p in params]
            if holds:
                for param in params:
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
            through_host(grads, partial(dist.all_reduce, op=dist.ReduceOp.SUM, group=pg),
                         [p.grad for p in params] if holds else ())


#: (the world group, member global ranks) -> their process group, made once per process
_SUBGROUPS: dict[tuple[int, tuple[int, ...]], Any] = {}


def _subgroup(members: tuple[int, ...]) -> Any:
    """The process group of ``members``, created the first time any pipeline asks for it.

    ``new_group`` must be entered by every process of the world, members or
    not, in the same order: every process builds the same pipelines from
    the same model, so all of them ask for the same groups in the same order.
    Made once per process, not per pipeline (each would hold its own connections).
    """
    key = (id(dist.group.WORLD), members)
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = dist.new_group(list(members))
    return _SUBGROUPS[key]


__all__ = ["TiedGroups"]
