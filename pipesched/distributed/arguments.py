"""A :class:`~pipesched.distributed.DistributedPipeline`'s constructor arguments: checked, then agreed.

Each process checks its own arguments first; a refusal is not raised at
once but joins the agreement (:func:`~pipesched.distributed.agreement.agree_on_options`),
so every process raises together, naming the refusal or each option that
differs, and no process is left waiting in a collective for one that gave up.
This is construction, not the step: the pipeline takes the answer and keeps
its own code to the step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipesched.distributed.agreement import agree_on_options, policy_name
from pipesched.distributed.mesh_parallel import refuse_under_mesh
from pipesched.distributed.ownership import StageLayout
from pipesched.distributed.traced import TracedModel, model_layout
from pipesched.runtime.data_parallel import check_data_parallel_group
from pipesched.runtime.host_buffer import refuse_sparse_gradients
from pipesched.runtime.options import check_flag
from pipesched.runtime.runner import StepOptions


@dataclass(frozen=True)
class Arguments:
    """What every rank agreed on: the step options, the stage layout, whether to gather timelines,
    and the traced model when ``module`` is not an ``nn.Sequential`` (``None`` otherwise)."""

    options: StepOptions
    layout: StageLayout
    gather_timeline: bool
    traced: TracedModel | None = None


def agreed_arguments(module: Any, *, balance: Sequence[int] | None, num_stages: int | None,
                     data_parallel_group: Any, dp_mesh: Any, data_parallel: str, gather_timeline: Any,
                     rank: int, num_ranks: int, group: Any, split_points: Sequence[str] | None = None,
                     forward_kwargs: Mapping[str, Any] | None = None, example_inputs: Mapping[str, Any] | None = None,
                     **step_options: Any) -> Arguments:
    """Check this rank's arguments and compare them across the ranks of ``group`` (collective).

    ``step_options``: the keyword arguments of :meth:`StepOptions.check <pipesched.runtime.runner.StepOptions.check>`.
    Raises on every rank if any rank refused its arguments or any option differs.
    """
    values, refused, checked = None, None, None
    try:  # this rank's own arguments first; a refusal still joins the agreement below
        parts = [m for m in (module.values() if isinstance(module, Mapping) else [module]) if isinstance(m, nn.Module)]
        if data_parallel_group is not None:
            check_data_parallel_group(data_parallel_group)  # before any thread starts
            # every rank checks the whole model (a dict: its own stages), so all refuse alike
            refuse_sparse_gradients(parts, "data_parallel_group")
        if dp_mesh is not None:
            refuse_under_mesh(step_options["deferred_batch_norm"])
        options = StepOptions.check(**step_options)
        flag = check_flag("gather_timeline", gather_timeline)
        layout, traced = model_layout(module, balance, num_stages, options.schedule, rank, num_ranks,
                                      split_points=split_points, forward_kwargs=forward_kwargs,
                                      example_inputs=example_inputs,
                                      deferred_batch_norm=step_options["deferred_batch_norm"])
        checked = Arguments(options, layout, flag, traced)
        values = {"schedule": options.schedule.name, "chunks": options.chunks, "balance": layout.balance,
                  "num_stages": layout.num_stages, "placement": layout.placement,
                  "split_points": traced.split_points if traced else None,
                  "checkpoint": policy_name(options.checkpoint),
                  "deferred_batch_norm": step_options["deferred_batch_norm"],
                  "gather_timeline": flag, "data_parallel_group": data_parallel_group is not None,
                  "data_parallel": data_parallel if dp_mesh is not None else None}
    except Exception as error:  # noqa: BLE001 - raised after the agreement, so no rank waits for this one
        refused = error
    agree_on_options(values, refused, rank, num_ranks, group)  # raises on every rank if any differ
    assert checked is not None  # no rank refused
    return checked


__all__ = ["Arguments", "agreed_arguments"]
