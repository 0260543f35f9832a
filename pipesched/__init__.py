"""pipesched: pipeline-parallel training for PyTorch with pluggable schedules.

::

    from pipesched import Pipeline
    pipe = Pipeline(model, schedule="1f1b", chunks=8, loss_fn=nn.CrossEntropyLoss())
    loss = pipe.step(inputs, targets)
"""

from pipesched.action import Action
from pipesched.batchnorm import DeferredBatchNorm, convert_deferred_batch_norm
from pipesched.checkpoint import is_checkpointing, is_recomputing
from pipesched.orchestrator import StepStalled
from pipesched.pipeline import Pipeline
from pipesched.registry import get_schedule, list_schedules, register_schedule
from pipesched.replay import Deadlock
from pipesched.report import StepReport, TaskRecord
from pipesched.schedule import Schedule, validate_plan
from pipesched.simulate import LowerBound, SimResult, lower_bound, simulate
from pipesched.timeline import Timeline, TimelineAnalysis, configure_jsonl_logging

__all__ = [
    "Action",
    "Deadlock",
    "DeferredBatchNorm",
    "LowerBound",
    "Pipeline",
    "Schedule",
    "SimResult",
    "StepReport",
    "StepStalled",
    "TaskRecord",
    "Timeline",
    "TimelineAnalysis",
    "configure_jsonl_logging",
    "convert_deferred_batch_norm",
    "get_schedule",
    "is_checkpointing",
    "is_recomputing",
    "list_schedules",
    "lower_bound",
    "register_schedule",
    "simulate",
    "validate_plan",
]

__version__ = "0.1.0"
