"""``GPipe``: torchgpipe's class, on pipesched's ``Pipeline`` (schedule ``"gpipe"``).

::

    from pipesched import GPipe          # was: from torchgpipe import GPipe
    model = GPipe(model, balance=[2, 2], devices=["cuda:0", "cuda:1"], chunks=8)
    output = model(input)                # forward of every micro-batch, gathered
    loss_fn(output, target).backward()   # backward of every micro-batch, through the pipeline
    optimizer.step()

Same constructor, attributes and habits as torchgpipe's ``GPipe``: the
pipeline is a sequence of its layers (``len``, indexing, iteration), exposes
``partitions``, ``devices``, ``balance``, ``chunks`` and ``checkpoint``,
checkpoints only in training mode, refuses ``.to(device)``, and converts batch
norms to deferred ones (updating once per ``chunks`` micro-batches) when
asked. Where it deliberately differs (stricter argument types, repeated
layers and tied weights that work, the model's own state-dict keys) the
migration guide (docs/guide/torchgpipe.md) says so.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from pipesched.pipeline import Pipeline
from pipesched.runtime.batchnorm import convert_deferred_batch_norm
from pipesched.runtime.checkpoint import POLICIES
from pipesched.runtime.partition import check_balance, resolve_device

_AUTO_BALANCE = (
    "; compute a balance from measurements instead: "
    "pipesched.balance.balance_by_time(partitions, model, sample) or "
    "pipesched.balance.balance_by_size(partitions, model, sample)"
)


class GPipe(Pipeline):
    """torchgpipe's ``GPipe(module, balance, devices=None, chunks=1, checkpoint="except_last",
    deferred_batch_norm=False)`` on a fill-drain :class:`~pipesched.Pipeline`.

    Args:
        module: an ``nn.Sequential``.
        balance: layers per partition (one partition per device); required.
        devices: one device per partition; extra devices are ignored. Default:
            every CUDA device, or one ``"cpu"`` per partition without CUDA.
        chunks: micro-batches per batch (an int >= 1).
        checkpoint: ``"always"``, ``"except_last"`` or ``"never"`` (or a
            callable ``(stage, microbatch) -> bool``); applies in training
            mode only, as torchgpipe's.
        deferred_batch_norm: convert the batch norms (in place) to
            :class:`~pipesched.DeferredBatchNorm` with ``chunks``.

    Raises:
        TypeError: ``module`` is not an ``nn.Sequential``; a wrongly typed argument.
        ValueError: no or a wrong balance, bad ``chunks`` or ``checkpoint``,
            or tensors shared in a way that cannot work (each error names them).
        IndexError: fewer devices than partitions.
    """

    def __init__(
        self,
        module: nn.Sequential,
        balance: Sequence[int] | None = None,
        *,
        devices: Sequence[str | int | torch.device] | None = None,
        chunks: int = 1,
        checkpoint: Any = "except_last",
        deferred_batch_norm: bool = False,
    ):
        if not isinstance(module, nn.Sequential):
            raise TypeError(
                f"module must be an nn.Sequential to be partitioned, got {type(module).__name__}; "
                f"wrap your layers in nn.Sequential(...)"
            )
        if len(module) == 0:
            raise ValueError("module is an empty nn.Sequential: there is nothing to partition "
                             "(torchgpipe returned the input unchanged; skip the pipeline instead)")
        if balance is None:
            raise ValueError("balance is required: one layer count per partition, e.g. balance=[2, 2]"
                             + _AUTO_BALANCE)
        try:
            balance = check_balance(balance, len(module))
        except ValueError as error:
            raise ValueError(f"{error}{_AUTO_BALANCE}") from None
        if isinstance(checkpoint, str) and checkpoint not in POLICIES:
            raise ValueError(
                f"checkpoint is not one of 'always', 'except_last', or 'never': got {checkpoint!r}"
            )
        super().__init__(
            module, schedule="gpipe", balance=balance, devices=_partition_devices(devices, len(balance)),
            chunks=chunks, checkpoint=checkpoint, deferred_batch_norm=deferred_batch_norm,
        )
        if deferred_batch_norm:
            convert_deferred_batch_norm(module, chunks)  # torchgpipe's standalone cadence too
        self._checkpoint_in_training_only()

    def _checkpoint_in_training_only(self) -> None:
        """torchgpipe checkpoints in training mode only: in eval mode nothing is recomputed."""
        policy = self._runner._policy
        owner = weakref.ref(self)  # the runner outlives no GPipe; no cycle through it

        def training_only(stage: int, microbatch: int, count: int) -> bool:
            gpipe = owner()
            return gpipe is not None and gpipe.training and policy(stage, microbatch, count)

        self._runner._policy = training_only

    # --------------------------------------------------------- a sequence

    @property
    def partitions(self) -> nn.ModuleList:
        """The partitions (stages), each an ``nn.Sequential`` sharing the model's layers."""
        return nn.ModuleList(self._stages)

    def __len__(self) -> int:
        """The number of layers of the underlying ``nn.Sequential``."""
        return len(self.module)

    def __getitem__(self, index: int) -> nn.Module:
        """The layer at ``index`` (negative counts from the end); ``IndexError`` beyond."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"GPipe indices are ints, got {type(index).__name__}")
        return self.module[index]

    def __iter__(self) -> Iterator[nn.Module]:
        """The layers of the underlying ``nn.Sequential``, in order."""
        return iter(self.module)

    # --------------------------------------------------------- state dict

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load the model's state dict, or one saved from torchgpipe's ``GPipe`` (``partitions.<p>.`` keys)."""
        return super().load_state_dict(_from_partition_keys(state_dict, ""), strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        translated = _from_partition_keys(state_dict, prefix)
        if translated is not state_dict:
            state_dict.clear()
            state_dict.update(translated)
        super()._load_from_state_dict(state_dict, prefix, *args)


def _partition_devices(devices: Any, partitions: int) -> list[torch.device]:
    """One device per partition, as torchgpipe chooses them (extra devices are ignored)."""
    if devices is None:
        if not torch.cuda.is_available():
            return [torch.device("cpu")] * partitions
        devices = list(range(torch.cuda.device_count()))
    elif isinstance(devices, (str, bytes, torch.device)) or not isinstance(devices, Sequence):
        raise TypeError(f"devices must be a list of devices, one per partition, got {devices!r}")
    if len(devices) < partitions:
        raise IndexError(
            f"too few devices to hold {partitions} partitions: got {len(devices)} ({list(devices)!r}); "
            f"give one device per partition (several partitions may share one, e.g. ['cpu'] * {partitions})"
        )
    return [resolve_device(d, i) for i, d in enumerate(devices[:partitions])]


def _from_partition_keys(state_dict: Any, prefix: str) -> Any:
    """``<prefix>partitions.<p>.<layer>...`` (torchgpipe's keys) as ``<prefix><layer>...`` (the model's).

    torchgpipe's partitions keep the layers' own names, so dropping the
    partition part gives exactly the model's key. Returns ``state_dict``
    itself when it holds no such key.
    """
    head = f"{prefix}partitions."
    if not any(key.startswith(head) for key in state_dict):
        return state_dict
    translated = type(state_dict)() if isinstance(state_dict, dict) else {}
    for key, value in state_dict.items():
        if key.startswith(head):
            partition, _, rest = key[len(head):].partition(".")
            if partition.isdigit() and rest:
                key = prefix + rest
        translated[key] = value
    if hasattr(state_dict, "_metadata"):
        translated._metadata = state_dict._metadata  # type: ignore[attr-defined]
    return translated


__all__ = ["GPipe"]
