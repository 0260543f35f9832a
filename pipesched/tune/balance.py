"""torchgpipe's automatic balance, on pipesched's profiler and exact partitioning.

::

    from pipesched.balance import balance_by_time
    balance = balance_by_time(4, model, sample)                        # one stage per rank
    balance = balance_by_time(4, model, sample, schedule="interleaved-1f1b")  # 8 stages, per rank
    pipe = Pipeline(model, schedule="interleaved-1f1b", balance=balance, chunks=8, loss_fn=...)

Same signatures and meaning as ``torchgpipe.balance``; two differences, both
on purpose:

* the split is exact (:func:`pipesched.plan.balance.balance_stages`: the
  contiguous cut minimising the largest stage), where torchgpipe's
  ``blockpartition`` is a heuristic that can miss the optimum;
* ``balance_by_size`` also works on the CPU (with the byte meter the
  pipeline's own memory report uses); torchgpipe's needs CUDA.

``schedule=`` makes the balance per *rank*: ``partitions`` is then the number
of ranks, the result has the schedule's stage count for them
(``schedule.default_num_stages(partitions)``), and the cut minimises the
largest sum over each rank's stages under the schedule's placement (looped
for interleaved 1F1B, V for ZB-V), :func:`pipesched.plan.balance.balance_ranks`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from pipesched.plan.balance import balance_ranks, balance_stages
from pipesched.plan.registry import get_schedule
from pipesched.plan.schedule import Schedule, validate_placement
from pipesched.runtime.microbatch import as_tensors, batch_size
from pipesched.tune.costs import Profile
from pipesched.tune.measure import _profile

__all__ = ["balance_by_size", "balance_by_time", "balance_cost"]

Device = torch.device | int | str


def _default_device() -> torch.device:
    """torchgpipe profiles on the current CUDA device; without CUDA, on the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def balance_cost(cost: list[float], partitions: int, schedule: str | Schedule | None = None) -> list[int]:
    """Layers per stage minimising the largest stage (or, with ``schedule``, rank) cost. Exact."""
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive int (stages, or ranks with schedule=), got {partitions!r}")
    if schedule is None:
        return balance_stages(cost, partitions).balance
    plan_schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
    if not isinstance(plan_schedule, Schedule):
        raise TypeError(f"schedule must be a registered name or a pipesched.Schedule, got {type(schedule).__name__}")
    stages = plan_schedule.default_num_stages(partitions)
    placement = validate_placement(plan_schedule.placement(stages, partitions), stages, partitions)
    if stages > len(cost):
        raise ValueError(
            f"schedule {plan_schedule.name!r} on {partitions} ranks needs {stages} stages, but the module "
            f"has {len(cost)} layers; use fewer ranks or a module with more layers"
        )
    return balance_ranks(cost, placement).balance


def balance_by_time(
    partitions: int,
    module: nn.Sequential,
    sample: Tensor | tuple[Tensor, ...],
    *,
    timeout: float = 1.0,
    device: Device | None = None,
    schedule: str | Schedule | None = None,
) -> list[int]:
    """Balance by measured time per layer (forward + backward), as ``torchgpipe.balance.balance_by_time``.

    Args:
        partitions: the number of stages (with ``schedule``: of ranks).
        module: the ``nn.Sequential`` to cut; not modified (each layer is profiled on a copy).
        sample: an example input; its batch size is the one profiled.
        timeout: profiling repeats until about this many seconds are spent in all (at least
            one warm-up and one timed run per layer); each layer's cost is its median.
        device: where to profile (default: the current CUDA device, else the CPU).
        schedule: balance per rank for this schedule's placement (see the module docstring).

    Returns:
        Layers per stage, for ``Pipeline(..., balance=...)`` (or ``GPipe(module, balance)``).

    As torchgpipe's, it refuses a module whose parameters already hold
    gradients, and it times the layers in training mode even when the module
    was left in ``eval()`` (the mode it will be trained in; dropout and batch
    norm cost differently in the two), restoring every submodule's mode after.
    """
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout) or timeout < 0:
        raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    _check_layers(module, partitions)
    _refuse_gradients(module)
    where = _default_device() if device is None else device
    with training_mode(module):
        measured = _profile(module, sample, None, None, device=where, repeat=1,
                            timeout=timeout / len(module), progress=None)
    return balance_cost(measured.layer_costs(), partitions, schedule)


def balance_by_size(
    partitions: int,
    module: nn.Sequential,
    input: Tensor | tuple[Tensor, ...],
    *,
    chunks: int = 1,
    param_scale: float = 2.0,
    device: Device | None = None,
    schedule: str | Schedule | None = None,
) -> list[int]:
    """Balance by memory per layer, as ``torchgpipe.balance.balance_by_size``.

    A layer's size is ``latent + param_scale × parameter bytes``: ``latent``
    is what one micro-batch of ``input`` (``ceil(rows / chunks)`` rows) keeps
    alive through the layer's forward: on CUDA the allocator's growth (as
    torchgpipe measures it), on the CPU its saved tensors other than its input
    plus its output. ``param_scale`` counts the copies of each parameter
    training holds: 2 for parameters and gradients, about 4 to 5 with Adam's
    two moments (torchgpipe's table: SGD 2-3, Adam 4-5, Adadelta 4, Adagrad 3,
    RMSprop 3-5).

    Args:
        partitions: the number of stages (with ``schedule``: of ranks).
        module: the ``nn.Sequential`` to cut; not modified.
        input: an example mini-batch of the size you will train with.
        chunks: the micro-batches per mini-batch you will train with.
        param_scale: copies of each parameter (see above); >= 0.
        device: where to profile (default: the current CUDA device, else the CPU).
        schedule: balance per rank for this schedule's placement.
    """
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive int (micro-batches per mini-batch), got {chunks!r}")
    if isinstance(param_scale, bool) or not isinstance(param_scale, (int, float)) or not param_scale >= 0:
        raise ValueError(f"param_scale must be a number >= 0 (copies of each parameter), got {param_scale!r}")
    _check_layers(module, partitions)
    tensors = as_tensors(input, "input")
    rows = -(-batch_size(tensors, "input") // chunks)
    micro = tensors[0][:rows] if isinstance(input, Tensor) else tuple(t[:rows] for t in tensors)
    where = _default_device() if device is None else device
    with training_mode(module):  # what one micro-batch keeps alive in training, as torchgpipe measures it
        measured = _profile(module, micro, None, None, device=where, repeat=1, timeout=None, progress=None)
    return balance_cost(size_costs(measured, param_scale), partitions, schedule)


def size_costs(measured: Profile, param_scale: float) -> list[float]:
    """Per layer: the bytes one micro-batch keeps alive in it plus ``param_scale`` × its parameter bytes."""
    costs = []
    for layer in measured.layers:
        latent: Any = layer.allocated_bytes
        if latent is None:  # CPU: the meter's view
            latent = layer.internal_bytes + layer.output_bytes
        costs.append(float(max(0, latent)) + param_scale * layer.parameter_bytes)
    return costs


@contextlib.contextmanager
def training_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in training mode for the block, then every submodule back in the mode it had.

    Restored per submodule, not with one ``module.train(previous)``: a model
    in training with one part frozen in ``eval()`` comes back exactly so.
    """
    modes = [(child, child.training) for child in module.modules()]
    module.train()
    try:
        yield
    finally:
        for child, mode in modes:
            child.training = mode


def _refuse_gradients(module: nn.Module) -> None:
    """torchgpipe's ``balance_by_time`` refuses parameters that hold gradients; so do we, naming them."""
    holding = [name for name, param in module.named_parameters() if param.grad is not None]
    if holding:
        shown = ", ".join(repr(name) for name in holding[:3]) + (f" and {len(holding) - 3} more"
                                                                  if len(holding) > 3 else "")
        raise ValueError(
            f"some parameter already has gradient: module's {shown} hold .grad from an earlier backward, "
            "and balance_by_time profiles a model before training (as torchgpipe, it refuses one mid-step); "
            "clear them first with module.zero_grad(set_to_none=True)"
        )


def _check_layers(module: Any, partitions: Any) -> None:
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        raise TypeError(f"module must be a non-empty nn.Sequential, got {type(module).__name__}")
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive int, got {partitions!r}")
    if partitions > len(module):
        raise ValueError(
            f"cannot cut a module of {len(module)} layers into {partitions} partitions; "
            f"use at most {len(module)} partitions"
        )
