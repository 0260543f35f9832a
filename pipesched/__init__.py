"""pipesched: pipeline-parallel training for PyTorch with pluggable schedules.

::

    from pipesched import Pipeline
    pipe = Pipeline(model, schedule="1f1b", chunks=8, loss_fn=nn.CrossEntropyLoss())
    loss = pipe.step(inputs, targets)

Public names load on first use (PEP 562), so ``import pipesched.plan`` (and
every schedule plug-in) does not pull in torch, anyio or structlog.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS = {
    "Action": "pipesched.plan.action",
    "Deadlock": "pipesched.plan.replay",
    "LowerBound": "pipesched.plan.simulate",
    "Schedule": "pipesched.plan.schedule",
    "SimResult": "pipesched.plan.simulate",
    "TaskRecord": "pipesched.plan.record",
    "get_schedule": "pipesched.plan.registry",
    "list_schedules": "pipesched.plan.registry",
    "lower_bound": "pipesched.plan.simulate",
    "register_schedule": "pipesched.plan.registry",
    "simulate": "pipesched.plan.simulate",
    "validate_plan": "pipesched.plan.schedule",
    "StepReport": "pipesched.observe.report",
    "Timeline": "pipesched.observe.timeline",
    "TimelineAnalysis": "pipesched.observe.timeline",
    "configure_jsonl_logging": "pipesched.observe.timeline",
    "CausalLMLoss": "pipesched.runtime.causal_lm_loss",
    "DeferredBatchNorm": "pipesched.runtime.batchnorm",
    "convert_deferred_batch_norm": "pipesched.runtime.batchnorm",
    "is_checkpointing": "pipesched.runtime.checkpoint",
    "is_recomputing": "pipesched.runtime.checkpoint",
    "StepStalled": "pipesched.runtime.orchestrator",
    "Pipeline": "pipesched.pipeline",
    "GPipe": "pipesched.gpipe",
    "DistributedPipeline": "pipesched.distributed",
    "Profile": "pipesched.tune.costs",
    "TuneResult": "pipesched.tune.search",
    "profile": "pipesched.tune.measure",
    "tune": "pipesched.tune",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipesched' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from pipesched.distributed import DistributedPipeline
    from pipesched.gpipe import GPipe
    from pipesched.observe.report import StepReport
    from pipesched.observe.timeline import Timeline, TimelineAnalysis, configure_jsonl_logging
    from pipesched.pipeline import Pipeline
    from pipesched.plan.action import Action
    from pipesched.plan.record import TaskRecord
    from pipesched.plan.registry import get_schedule, list_schedules, register_schedule
    from pipesched.plan.replay import Deadlock
    from pipesched.plan.schedule import Schedule, validate_plan
    from pipesched.plan.simulate import LowerBound, SimResult, lower_bound, simulate
    from pipesched.runtime.batchnorm import DeferredBatchNorm, convert_deferred_batch_norm
    from pipesched.runtime.causal_lm_loss import CausalLMLoss
    from pipesched.runtime.checkpoint import is_checkpointing, is_recomputing
    from pipesched.runtime.orchestrator import StepStalled
    from pipesched.tune import tune
    from pipesched.tune.costs import Profile
    from pipesched.tune.measure import profile
    from pipesched.tune.search import TuneResult
