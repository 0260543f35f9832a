"""``DistributedPipeline(any_model, split_points=...)``: every process traces the whole model, each keeps its stages.

The single-process cut (:mod:`pipesched.runtime.any_model`) is reused as it
is. What changes across processes, and why:

* **Every process traces and probes the whole model.** The trace is
  deterministic, so every process derives the same stages and the same
  messages; a refusal (a model ``torch.export`` cannot capture, a cut that
  disagrees with the model) is raised on every process alike, through the
  options agreement, so no process is left waiting in a collective.
* **Each process keeps only its own stages**, whose tensors are the user's
  own objects: ``pipe.parameters()`` are this rank's, and its optimizer
  steps exactly those.
* **A parameter used by stages of two processes** (a tied embedding and
  head) takes the existing path (:mod:`pipesched.distributed.tied`): every
  holder keeps its copy, the lowest holder's value is broadcast once, and
  the gradients are summed over the holders after each backward.
* **A buffer read by stages of two processes** (a rotary ``inv_freq`` that a
  later stage reads itself) is replicated by copy: the cut refuses forwards
  that write buffers, so a copy can never drift, and the lowest holder's
  value is broadcast once so that every process reads the same one.
  (Most models read ``inv_freq`` once, on the first stage, and the cut sends
  the cos/sin it makes, as any activation.)
* **The state dict keeps the model's keys**: this rank's part of
  ``model.state_dict()``, the entries whose tensors its stages hold (a tied
  weight under each of its names), so the ranks' parts together are the
  model's state dict.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipesched.distributed.ownership import Ownership, StageLayout, stage_layout
from pipesched.distributed.tied import TiedGroups
from pipesched.plan.schedule import Schedule, validate_placement
from pipesched.runtime.any_model import ModelCut, check_cut_arguments, resolve_cut
from pipesched.runtime.host_buffer import through_host
from pipesched.runtime.skip.layout import inspect_skip_layout

_CUT_ARGUMENTS = ("split_points", "forward_kwargs", "example_inputs")


@dataclass
class TracedModel:
    """A model cut by tracing, as one process of a :class:`~pipesched.distributed.DistributedPipeline` holds it."""

    model: nn.Module
    cut: ModelCut
    split_points: list[str]
    view: ModelKeyedView | None = None

    def check_inputs(self, inputs: object) -> None:
        """Stage 0's inputs against what the model was traced with (keys, dtypes, sizes, mode)."""
        self.cut.check_inputs(inputs, self.model.training)

    def own(self, layout: StageLayout, rank: int, group: Any, global_rank: Callable[[int], int],
            device: torch.device) -> Ownership:
        """This rank's stages, placed on ``device``; ties and shared buffers agreed with the other processes.

        Call it on every process of ``group`` in the same order (it creates
        process groups and broadcasts).
        """
        stages = list(self.cut.stages)
        placement = list(layout.placement)
        tied = TiedGroups(stages, placement, rank, group, global_rank)
        _broadcast_shared_buffers(self.model, stages, placement, group, global_rank)
        own = {s: stage for s, stage in enumerate(stages) if placement[s] == rank}
        self.cut.place([device] * len(stages))
        self.view = ModelKeyedView(self.model, list(own.values()))
        return Ownership(layout.num_stages, placement, own, inspect_skip_layout(stages), tied)


class ModelKeyedView:
    """This rank's part of ``model.state_dict()``: the entries whose tensors its stages hold.

    ``module`` is a plain ``nn.Module`` tree registering those very tensors
    under the model's keys (nothing copied), so torch's own ``state_dict`` and
    ``load_state_dict`` (strictness included) work on it unchanged.
    """

    def __init__(self, model: nn.Module, stages: Sequence[nn.Module]):
        held = {id(t) for stage in stages for t in (*stage.parameters(), *stage.buffers())}
        entries = model.state_dict(keep_vars=True)
        self.module = nn.Module()
        self.foreign = frozenset(key for key, value in entries.items() if id(value) not in held)
        for key, value in entries.items():
            if id(value) in held:
                owner, _, name = key.rpartition(".")
                module = self.module
                for part in owner.split(".") if owner else ():
                    if part not in module._modules:
                        module.add_module(part, nn.Module())
                    module = module._modules[part]  # type: ignore[assignment]
                if isinstance(value, nn.Parameter):
                    module.register_parameter(name, value)
                else:
                    module.register_buffer(name, value)

    def without_foreign(self, state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
        """``state_dict`` less the entries other ranks hold, keeping its ``_metadata``."""
        kept: OrderedDict[str, Any] = OrderedDict((k, v) for k, v in state_dict.items() if k not in self.foreign)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            kept._metadata = metadata  # type: ignore[attr-defined]
        return kept


def model_layout(module: Any, balance: Any, num_stages: Any, schedule: Schedule, rank: int, num_ranks: int,
                 **cut: Any) -> tuple[StageLayout, TracedModel | None]:
    """The layout of ``module`` and, for a model that is neither an ``nn.Sequential`` nor a dict of
    stages, its traced cut (``cut``: ``split_points``, ``forward_kwargs``, ``example_inputs``,
    ``deferred_batch_norm``, as :class:`~pipesched.Pipeline` takes them).

    Runs no collective, so a refusal on one rank reaches the others through the options agreement.
    """
    if isinstance(module, Mapping):
        for name in _CUT_ARGUMENTS:
            if cut.get(name) is not None:
                raise ValueError(f"{name}={cut[name]!r} is for a whole model that is not an nn.Sequential; a "
                                 f"dict of stages is already cut: leave {name} out")
        return stage_layout(module, balance, num_stages, schedule, rank, num_ranks), None
    if check_cut_arguments(module, **cut):
        return stage_layout(module, balance, num_stages, schedule, rank, num_ranks), None
    if num_stages is not None:
        raise ValueError(f"num_stages={num_stages!r} is for a dict of stages; a traced model's stages are "
                         f"counted by split_points (or balance): leave num_stages out")
    # devices only count the ranks here: every process holds one, and its stages go to its own device
    points, _, units = resolve_cut(module, schedule, cut.get("split_points"), balance, ["cpu"] * num_ranks)
    traced = ModelCut(module, points, cut.get("example_inputs"), cut.get("forward_kwargs"))
    count = len(points) + 1
    placement = validate_placement(schedule.placement(count, num_ranks), count, num_ranks)
    return StageLayout(tuple(units), count, tuple(placement)), TracedModel(module, traced, points)


def _broadcast_shared_buffers(model: nn.Module, stages: Sequence[nn.Module], placement: Sequence[int],
                              group: Any, global_rank: Callable[[int], int]) -> None:
    """Give every process the lowest holder's value of each model buffer read by stages of several ranks.

    Every process holds the whole model, so every one takes part in each
    broadcast with its own copy, in the model's buffer order.
    """
    holders: dict[int, set[int]] = {}
    for index, stage in enumerate(stages):
        for buffer in stage.buffers():
            holders.setdefault(id(buffer), set()).add(placement[index])
    with torch.no_grad():
        for _, buffer in model.named_buffers():
            ranks = holders.get(id(buffer), set())
            if len(ranks) > 1:
                through_host([buffer], partial(dist.broadcast, src=global_rank(min(ranks)), group=group), [buffer])


__all__ = ["ModelKeyedView", "TracedModel", "model_layout"]
