"""Cut an ``nn.Sequential`` into stages and resolve the devices of ranks.

A stage is a run of consecutive layers wrapped in its own ``nn.Sequential``
that shares the layer objects (and so the parameters) with the user's module,
so ``model.parameters()`` and the optimizer see the very tensors the pipeline
trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

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


def split_module(module: nn.Sequential, balance: Sequence[int]) -> list[nn.Sequential]:
    """One ``nn.Sequential`` per stage, keeping the layers' original names."""
    named = list(module.named_children())
    stages, first = [], 0
    for count in balance:
        stage = nn.Sequential()
        for name, layer in named[first : first + count]:
            stage.add_module(name, layer)
        stages.append(stage)
        first += count
    return stages


def resolve_device(device: object, index: int) -> torch.device:
    """``devices[index]`` as a ``torch.device`` that exists on this machine.

    An int is a CUDA device index (``0`` is ``"cuda:0"``). Every refusal names
    the fix.
    """
    where = f"devices[{index}] = {device!r}"
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
