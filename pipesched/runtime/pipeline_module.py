"""What both pipeline classes are as ``nn.Module``s: placed by themselves, run by a step runner.

``nn.Module.to(device)`` would move every stage onto one device and undo the
pipeline's placement (or, in a multi-process pipeline, move this rank's
stages off the device its transport expects). Both pipelines therefore
accept only ``.to(dtype)`` and refuse the device forms with one clear error.
Both also expose their runner's ``log_tasks`` switch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from pipesched.runtime.orchestrator import Orchestrator
    from pipesched.runtime.runner import StepRunner

_MOVED = (
    "a pipeline places its stages on its devices itself; moving it with {how} would undo that. "
    "Pass the devices when building it instead (Pipeline(devices=[...]), DistributedPipeline(device=...))"
)


class PipelineModule(nn.Module):
    """``nn.Module`` whose ``.to(device)``, ``.cuda()`` and ``.cpu()`` raise ``TypeError``.

    Subclasses set ``self._runner`` (a :class:`~pipesched.runtime.runner.StepRunner`).
    """

    _runner: StepRunner

    @property
    def log_tasks(self) -> bool:
        """Emit one structlog event per task (and per message, multi-process); may be switched between steps."""
        return self._runner.log_tasks

    @log_tasks.setter
    def log_tasks(self, value: bool) -> None:
        self._runner.log_tasks = bool(value)

    @property
    def _orchestrator(self) -> Orchestrator:  # tests and tools reach the workers through it
        return self._runner.orchestrator

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Only ``.to(dtype)`` (and ``memory_format=``): the pipeline placed its stages itself.

        The device is looked for in the arguments directly, not by parsing them
        as ``torch`` does: parsing ``"cuda"`` or ``0`` fails on a machine
        without CUDA with an error that hides this one.
        """
        device = kwargs.get("device", kwargs.get("tensor"))  # to(tensor=t) moves to t's device too
        if device is None and args and not isinstance(args[0], torch.dtype):
            device = args[0]  # a device, a device string or index, or a tensor to match
        if device is not None:
            raise TypeError(_MOVED.format(how=".to(device)"))
        return super().to(*args, **kwargs)

    def cuda(self, device: Any = None) -> Any:
        raise TypeError(_MOVED.format(how=".cuda()"))

    def cpu(self) -> Any:
        raise TypeError(_MOVED.format(how=".cpu()"))
