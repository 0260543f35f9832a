"""Where the check runs (a CUDA device, or the CPU for the dry run) and the helpers every item uses.

One place knows the difference between the two: synchronising, busying the
caller's stream, peak memory, and out-of-memory recovery. Items call these
and run the same code on both, so the dry run exercises what the device run
will execute.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipesched.plan.balance import balance_stages


@dataclass
class Env:
    device: torch.device
    dry_run: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
        """Wall-clock seconds of ``fn(*args)`` with the device idle before and after."""
        self.sync()
        start = time.perf_counter()
        value = fn(*args)
        self.sync()
        return time.perf_counter() - start, value

    def busy_caller_stream(self, seconds: float) -> None:
        """Keep the caller's stream busy for about ``seconds`` (host returns at once) — CUDA only."""
        if self.cuda:
            torch.cuda._sleep(int(seconds * _cycles_per_second(self.device)))

    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # -- memory -----------------------------------------------------------
    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def reset_peak(self) -> int:
        """Start a peak measurement; returns the bytes allocated now (CUDA; 0 on CPU)."""
        if not self.cuda:
            return 0
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def is_oom(self, error: BaseException) -> bool:
        kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if k is not None)
        return isinstance(error, kinds) or "out of memory" in str(error).lower()

    @contextlib.contextmanager
    def memory_cap(self, cap_bytes: int) -> Iterator[float | None]:
        """Cap this process's CUDA allocator at ``cap_bytes`` (yields the fraction), and lift it after."""
        if not self.cuda:
            yield None
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        fraction = min(1.0, cap_bytes / total)
        self.free()
        torch.cuda.set_per_process_memory_fraction(fraction, self.device)
        try:
            yield fraction
        finally:
            self.free()
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)


_CYCLES: dict[int, float] = {}


def _cycles_per_second(device: torch.device) -> float:
    """``torch.cuda._sleep`` cycles per second on ``device``, measured once with CUDA events."""
    index = device.index or 0
    if index not in _CYCLES:
        cycles = 50_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _CYCLES[index] = cycles / max(start.elapsed_time(end) / 1e3, 1e-6)
    return _CYCLES[index]


def describe(env: Env) -> dict[str, Any]:
    """The device facts every figure depends on."""
    import datetime
    import platform

    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "device": str(env.device), "dry_run": env.dry_run,
    }
    if env.cuda:
        props = torch.cuda.get_device_properties(env.device)
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        info["device_name"] = "cpu"
    return info


# -- schedules -------------------------------------------------------------------

#: what the dry run covers in items 3-5: unsplit and split backwards, one-stage and V placements
DRY_SCHEDULES = ("gpipe", "1f1b", "zb-h1", "zb-v")


def schedules(env: Env, p: int, priority: Sequence[str] = ()) -> list[tuple[str, int]]:
    """(name, stages) of every registered schedule that fits p ranks, ``priority`` names first."""
    from pipesched.plan.registry import schedules_for

    fits = dict(schedules_for(p))
    names = [n for n in priority if n in fits] + [n for n in fits if n not in priority]
    if env.dry_run:
        names = [n for n in names if n in DRY_SCHEDULES]
    return [(name, fits[name]) for name in names]


# -- stage balance -------------------------------------------------------------


def layer_costs(env: Env, model: nn.Sequential, sample: torch.Tensor, autocast: torch.dtype | None = None) -> list[float]:
    """Seconds of forward + backward of each layer alone on ``sample``'s successive activations.

    The second of two timed runs counts (the first warms kernels up). Used
    only to balance stages; nothing is asserted on it.
    """
    def forward_backward(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        with env.autocast(autocast):
            out = layer(inp)
        if out.requires_grad:
            out.float().sum().backward()
        return out

    costs = []
    x = sample
    for layer in model:
        inp = x.detach().requires_grad_(x.is_floating_point())
        env.timed(forward_backward, layer, inp)
        elapsed, out = env.timed(forward_backward, layer, inp)
        costs.append(elapsed)
        x = out.detach()
    model.zero_grad(set_to_none=True)
    return costs


def contiguous_partition(costs: Sequence[float], parts: int) -> list[int]:
    """Layers per stage for ``parts`` consecutive stages minimising the largest stage's cost.

    The library's exact balance (:func:`pipesched.plan.balance.balance_stages`), which
    ``pipesched.balance`` and ``tune`` use too.
    """
    return list(balance_stages(costs, parts).balance)
