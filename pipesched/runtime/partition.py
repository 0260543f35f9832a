"""Cut an ``nn.Sequential`` into stages and resolve the devices of ranks (and layers per stage).

A stage is a run of consecutive layers wrapped in its own ``nn.Sequential``
that shares the layer objects (and so the parameters) with the user's module,
so ``model.parameters()`` and the optimizer see the very tensors the pipeline
trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipesched.plan.schedule import Schedule

DeviceLike = str | int | torch.device


def check_balance(balance: object, num_layers: int) -> list[int]:
    """Validate ``balance`` (layers per stage) against a module of ``num_layers`` layers."""
    if isinstance(balance, (str, bytes)) or not isinstance(balance, Sequence) or not balance:
        raise ValueError(f"balance must be a non-empty list of layer counts, got {balance!r}")
    for index, count in enumerate(balance):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(
                f"balance[{index}] = {count!r}: every stage needs an int number of layers >= 1"
            )
    if sum(balance) != num_layers:
        raise ValueError(
            f"balance {list(balance)} sums to {sum(balance)}, but the module has {num_layers} "
            f"layers; the entries must add up to len(module)"
        )
    return list(balance)


def even_balance(num_layers: int, num_stages: int) -> list[int]:
    """Layers per stage for ``num_stages`` near-equal stages (earlier stages get the extra)."""
    if num_stages > num_layers:
        raise ValueError(
            f"cannot cut a module of {num_layers} layers into {num_stages} stages; "
            f"give fewer devices or a module with more layers"
        )
    return [num_layers // num_stages + (1 if i < num_layers % num_stages else 0) for i in range(num_stages)]


def resolve_layout(
    num_layers: int, schedule: Schedule, balance: Any, devices: Any
) -> tuple[list[torch.device], list[int]]:
    """One device per rank and layers per stage, from what the user gave (see ``Pipeline``'s
    ``balance`` and ``devices``); ``num_layers`` is what ``balance`` counts."""
    if devices is not None:
        if isinstance(devices, (str, bytes, torch.device)) or not isinstance(devices, Sequence) or not devices:
            raise ValueError(f"devices must be a non-empty list (one entry per rank), got {devices!r}")
        devices = [resolve_device(d, i) for i, d in enumerate(devices)]
    if balance is not None:
        balance = check_balance(balance, num_layers)
        if devices is None:
            ranks = next(
                (r for r in range(1, len(balance) + 1) if schedule.default_num_stages(r) == len(balance)),
                None,
            )
            if ranks is None:
                raise ValueError(
                    f"schedule {schedule.name!r} cannot place {len(balance)} stages on any number "
                    f"of ranks by default; pass devices explicitly"
                )
            devices = default_devices(ranks)
        return devices, balance
    if devices is None:
        devices = default_devices(None)
        while len(devices) > 1 and schedule.default_num_stages(len(devices)) > num_layers:
            devices = devices[:-1]
    return devices, even_balance(num_layers, schedule.default_num_stages(len(devices)))


def split_module(module: nn.Sequential, balance: Sequence[int]) -> list[nn.Sequential]:
    """One ``nn.Sequential`` per stage, keeping the layers' original names (their indices).

    The layer list is cut as ``len(module)`` counts it: a layer object that
    appears twice (``nn.Sequential(lin, act, lin, act)``) is two layers, run
    at both positions. (``named_children()`` would list it once and shift
    every later layer into the wrong stage.)
    """
    named = list(module._modules.items())
    stages, first = [], 0
    for count in balance:
        stage = nn.Sequential()
        for name, layer in named[first : first + count]:
            stage.add_module(name, layer)
        stages.append(stage)
        first += count
    return stages


def resolve_device(device: object, index: int | None = None) -> torch.device:
    """``devices[index]`` (or, with no index, the argument ``device``) as a ``torch.device`` that exists here.

    An int is a CUDA device index (``0`` is ``"cuda:0"``). Every refusal names
    the fix.
    """
    where = f"devices[{index}] = {device!r}" if index is not None else f"device = {device!r}"
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise ValueError(f"{where}: a CUDA device index must be >= 0; use 'cpu' or 'cuda:<index>'")
        device = torch.device("cuda", device)
    try:
        resolved = torch.device(device)  # type: ignore[arg-type]
    except (TypeError, RuntimeError) as error:
        reason = f"a {type(device).__name__}" if isinstance(error, TypeError) else str(error).splitlines()[0]
        raise ValueError(f"{where} is not a torch device ({reason}); use 'cpu' or 'cuda:<index>'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{where}, but CUDA is not available here; use 'cpu'")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        count = torch.cuda.device_count()
        if resolved.index >= count:
            raise ValueError(
                f"{where}, but only {count} CUDA device(s) exist; use 'cuda:0' to 'cuda:{count - 1}' or 'cpu'"
            )
    elif resolved.type != "cpu":
        raise ValueError(f"{where}: pipesched runs on 'cpu' and 'cuda' devices; use 'cpu' or 'cuda:<index>'")
    return resolved


def default_devices(num_ranks: int | None) -> list[torch.device]:
    """One rank per CUDA device when there are any, else ``num_ranks`` (default 2) CPU ranks."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return [torch.device("cuda", r % count) for r in range(num_ranks or count)]
    return [torch.device("cpu")] * (num_ranks or 2)


def check_shared_parameters(
    stages: Sequence[nn.Module],
    placement: Sequence[int],
    devices: Sequence[torch.device] | None,
) -> None:
    """Refuse a tensor shared by stages in a way no copy scheme can keep exact.

    A parameter used by several stages (a layer object repeated in the
    ``nn.Sequential``, or a tied embedding and output head,
    ``head.weight = emb.weight``) is exact:

    * stages on one device share the tensor itself (autograd accumulates
      every stage's gradient into the one ``.grad``);
    * stages on different devices of one process use a replica per device,
      refreshed from the owner every step, whose gradients are summed into
      the owner (:mod:`pipesched.runtime.tied`);
    * stages in different processes each hold a copy; the copies' gradients
      are summed across those processes after each backward, so identical
      optimizer steps keep them identical (:mod:`pipesched.distributed.tied`).

    Refused here, before anything runs: a *buffer* shared by stages on
    different devices or processes (forwards update buffers in place, so
    copies would drift), and, in one process, one *layer object* holding a
    parameter used by stages on different devices (a layer holds one tensor
    per name, so it cannot hold a replica on one device and the owner on the
    other). Each error names the tensor, the stages and the fix.

    ``devices[rank]`` is the device of each rank; ``None`` means each rank is
    its own process (:class:`~pipesched.distributed.DistributedPipeline`).
    """
    def home(stage: int) -> object:
        return placement[stage] if devices is None else devices[placement[stage]]

    def where(by_stage: dict[int, list[str]]) -> str:
        return ", ".join(
            f"stage {s} (rank {placement[s]}, "
            f"{f'process of rank {placement[s]}' if devices is None else devices[placement[s]]})"
            for s in sorted(by_stage)
        )

    buffers: dict[int, dict[int, list[str]]] = {}
    layers: dict[int, tuple[nn.Module, dict[int, list[str]]]] = {}
    for index, stage in enumerate(stages):
        for name, tensor in stage.named_buffers(remove_duplicate=False):
            if tensor is not None:
                buffers.setdefault(id(tensor), {}).setdefault(index, []).append(name)
        if devices is None:
            continue
        for name, module in stage.named_modules(remove_duplicate=False):
            if any(p is not None for p in module._parameters.values()):
                layers.setdefault(id(module), (module, {}))[1].setdefault(index, []).append(name)
    for by_stage in buffers.values():
        if len({home(s) for s in by_stage}) > 1:
            names = " = ".join(map(repr, sorted({n for ns in by_stage.values() for n in ns}, key=_layer_order)))
            place = ("stages on one rank (balance=..., or a schedule placing those stages on one rank)"
                     if devices is None else
                     "stages on one device (devices=[...] with one device for their ranks, or balance=...)")
            fix = (
                f"forwards update buffers in place, so copies would drift apart; give the layers "
                f"using it to {place}, or give each layer its own buffer"
            )
            raise ValueError(f"buffer {names} is shared by {where(by_stage)}: {fix}")
    for module, by_stage in layers.values():
        if len({home(s) for s in by_stage}) > 1:
            names = " = ".join(map(repr, sorted({n for ns in by_stage.values() for n in ns}, key=_layer_order)))
            params = [n for n, p in module._parameters.items() if p is not None]
            tie = "; ".join(f"twin.{n} = layer.{n}" for n in params)
            raise ValueError(
                f"layer {names} (one {type(module).__name__} object) is used by {where(by_stage)}: a "
                f"layer object holds one tensor per parameter, so it cannot use a replica on one device "
                f"and the original on another. Give the later position its own layer with the parameters "
                f"tied (twin = copy.deepcopy(layer); {tie}), which pipesched replicates per device, or "
                f"place those stages on one device (devices=[...] with one device for their ranks)"
            )


def _layer_order(name: str) -> tuple[int, str]:
    head = name.split(".", 1)[0]
    return (int(head) if head.isdigit() else -1, name)
