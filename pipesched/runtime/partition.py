"""Cut an ``nn.Sequential`` into stages and resolve the devices of ranks.

A stage is a run of consecutive layers wrapped in its own ``nn.Sequential``
that shares the layer objects (and so the parameters) with the user's module,
so ``model.parameters()`` and the optimizer see the very tensors the pipeline
trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

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
    """Refuse a parameter or buffer shared by stages that do not see one copy of it.

    A tensor used by several stages (a layer object repeated in the
    ``nn.Sequential``, or a tied embedding and output head,
    ``head.weight = emb.weight``) is exact when every stage using it lives on
    one device of one process: each stage's backward accumulates into the
    same ``.grad`` (autograd serialises the accumulation), as the
    un-pipelined backward does. Stages on different devices would need one
    copy per device (moving the stages would leave the tensor on the last
    one), and stages in different processes each hold their own copy that
    would silently drift apart; both are refused here, before anything runs.

    ``devices[rank]`` is the device of each rank; ``None`` means each rank is
    its own process (:class:`~pipesched.distributed.DistributedPipeline`).
    """
    users: dict[int, tuple[Tensor, str, dict[int, list[str]]]] = {}
    for index, stage in enumerate(stages):
        named = [*stage.named_parameters(remove_duplicate=False), *stage.named_buffers(remove_duplicate=False)]
        for name, tensor in named:
            if tensor is None:
                continue
            kind = "parameter" if isinstance(tensor, nn.Parameter) else "buffer"
            entry = users.setdefault(id(tensor), (tensor, kind, {}))
            entry[2].setdefault(index, []).append(name)
    for _, kind, by_stage in users.values():
        if len(by_stage) < 2:
            continue
        homes = {
            s: f"process of rank {placement[s]}" if devices is None else str(devices[placement[s]])
            for s in by_stage
        }
        if devices is None:
            separate = len({placement[s] for s in by_stage}) > 1
        else:
            separate = len({devices[placement[s]] for s in by_stage}) > 1
        if not separate:
            continue
        names = sorted({n for ns in by_stage.values() for n in ns}, key=_layer_order)
        where = ", ".join(f"stage {s} (rank {placement[s]}, {homes[s]})" for s in sorted(by_stage))
        if devices is None:
            fix = (
                "each process would train its own copy and the copies would silently diverge; "
                "give the layers using it to stages on one rank (balance=...), or untie them"
            )
        else:
            fix = (
                "stages on different devices cannot share one tensor; place those stages on one "
                "device (devices=[...] with the same device for their ranks, or balance=... "
                "to put the layers in one stage), or untie them"
            )
        raise ValueError(f"{kind} {' = '.join(map(repr, names))} is shared by {where}: {fix}")


def _layer_order(name: str) -> tuple[int, str]:
    head = name.split(".", 1)[0]
    return (int(head) if head.isdigit() else -1, name)
