"""``pipesched.profile``: measure every layer's F, B, W time and its bytes, at one micro-batch size.

Each layer is measured alone, on a deep copy moved to ``device`` (the
user's model, its ``.grad`` and its batch-norm statistics are left alone),
fed the output the previous copy produced, in order, after one warm-up run:

* F: the layer's forward (the last layer's includes ``loss_fn(output, targets)``);
* B and W: the split backward the zero-bubble schedules run
  (:func:`~pipesched.runtime.split_backward.backward_input`, then
  ``WeightWork.run``), so B and W are measured, not guessed from the whole;
* the whole backward, once more from a fresh forward (what an unsplit B runs);
* bytes: the tensors autograd saves, through ``saved_tensors_hooks`` exactly as
  the checkpoint manager's meter sees them, and on CUDA the allocator's growth.

Times are medians of ``repeat`` runs: on the CPU wall time
(``time.perf_counter``), on CUDA the device time between CUDA events. Cost
is not linear in rows (per-call overhead dominates small micro-batches), so
profile at the size the pipeline will run: ``inputs`` *is* one micro-batch.
Random draws (dropout) come from a fixed seed, so a profile is repeatable.
"""

from __future__ import annotations

import copy
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipesched.runtime.microbatch import as_tensors, batch_size
from pipesched.runtime.partition import resolve_device
from pipesched.runtime.skip.tracker import SkipKey, SkipTracker, use_skip_tracker
from pipesched.runtime.split_backward import backward_input
from pipesched.runtime.stage_input import stage_leaf, stage_views
from pipesched.tune.costs import LayerProfile, Profile

__all__ = ["Progress", "profile", "progress_reporter"]

#: ``progress=``: off, on (tqdm when installed, else one line per layer on stderr), or your callback.
Progress = bool | Callable[[str], None] | None


def profile(
    module: nn.Sequential,
    inputs: Tensor | tuple[Tensor, ...],
    targets: Any = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    *,
    device: str | torch.device | None = None,
    repeat: int = 3,
    progress: Progress = None,
) -> Profile:
    """Measure each layer of ``module`` on ``inputs`` (one micro-batch); see the module docstring.

    Args:
        module: the ``nn.Sequential`` a pipeline will cut; not modified.
        inputs: a micro-batch of the size the pipeline will run (a Tensor or a tuple of Tensors).
        targets, loss_fn: when both are given, the last layer's forward and backward include
            the loss, as on a pipeline's last stage; otherwise the last layer's backward is
            seeded with a gradient of ones.
        device: where to measure (default: where the module's first parameter is, else CPU).
        repeat: timed runs per layer after one warm-up; each figure is their median.
        progress: ``True`` shows progress (tqdm if installed, else a line per layer on
            stderr), a callable hears one line per layer, ``None``/``False`` is silent.
    """
    return _profile(module, inputs, targets, loss_fn, device=device, repeat=repeat, timeout=None,
                    progress=progress)


def _profile(
    module: nn.Sequential, inputs: Any, targets: Any, loss_fn: Any, *, device: Any, repeat: int,
    timeout: float | None, progress: Progress,
) -> Profile:
    """:func:`profile`, optionally repeating each layer until ``timeout`` seconds are spent on it.

    The measuring runs on a thread of its own, as a pipeline runs its tasks on
    worker threads: on a CPU, torch's intra-op thread pool behaves differently
    on the main thread (under load, its OpenMP team can make small ops take
    ten times longer there than on a worker), and the profile must time what
    the pipeline will see.
    """
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["profile"] = _profile_here(module, inputs, targets, loss_fn, device=device, repeat=repeat,
                                               timeout=timeout, progress=progress)
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=work, name="pipesched-profile", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["profile"]


def _profile_here(
    module: nn.Sequential, inputs: Any, targets: Any, loss_fn: Any, *, device: Any, repeat: int,
    timeout: float | None, progress: Progress,
) -> Profile:
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        raise TypeError(f"module must be a non-empty nn.Sequential, got {type(module).__name__}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1 (timed runs per layer), got {repeat!r}")
    if loss_fn is not None and targets is None:
        raise ValueError("loss_fn needs targets: pass targets=... for the micro-batch, or leave both out")
    tensors = as_tensors(inputs, "inputs")
    rows = batch_size(tensors, "inputs")
    where = _device(module, device)
    say = progress_reporter(progress, total=len(module), what="profile")
    input_requires_grad = any(t.requires_grad for t in tensors)
    layers: list[LayerProfile] = []
    with torch.random.fork_rng(devices=[where] if where.type == "cuda" else []), \
            use_skip_tracker(_ProfileSkips()):
        torch.manual_seed(0)
        current: tuple[Tensor, ...] = tuple(t.detach().to(where) for t in tensors)
        wants_grad = [t.requires_grad for t in tensors]
        single = isinstance(inputs, Tensor)
        for index, layer in enumerate(module):
            last = index == len(module) - 1
            loss = (loss_fn, _to(targets, where)) if last and loss_fn is not None else None
            measured, current, single = _measure_layer(index, layer, current, wants_grad, loss, where, repeat,
                                                       timeout, single)
            wants_grad = [True] * len(current)
            layers.append(measured)
            say(f"layer {index} ({measured.name}): F {measured.forward_s * 1e3:.3f} ms, "
                f"B {measured.backward_input_s * 1e3:.3f} ms, W {measured.backward_weight_s * 1e3:.3f} ms")
    say(None)
    return Profile(rows=rows, device=str(where), repeat=repeat, input_requires_grad=input_requires_grad,
                   loss=loss_fn is not None, layers=layers)


class _ProfileSkips(SkipTracker):
    """Skip connections while layers are timed one at a time, each run several times.

    A plain tracker hands a stashed tensor over once, to the one pop of a
    whole-model call. Here the popping layer runs once per repeat, long after
    the stashing layer's last run: so a stash is kept (the last run's) and
    every pop reads it again. It is kept detached, as a leaf that requires
    grad like the original, so the popping layer's timed backward stops at it
    (as a stage's backward stops at a received skip tensor) instead of running
    into the stashing layer's graph a second time.
    """

    def save(self, key: SkipKey, tensor: Tensor | None) -> None:
        if tensor is not None:
            tensor = stage_leaf(tensor, tensor.requires_grad)
        self.tensors[key] = tensor

    def load(self, key: SkipKey) -> Tensor | None:
        tensor = self.tensors[key]
        return None if tensor is None else stage_views((tensor,))[0]  # a pop may start with an in-place op


def _measure_layer(
    index: int, original: nn.Module, inputs: tuple[Tensor, ...], wants_grad: Sequence[bool], loss: Any,
    device: torch.device, repeat: int, timeout: float | None, single: bool,
) -> tuple[LayerProfile, tuple[Tensor, ...], bool]:
    layer = copy.deepcopy(original).to(device)
    params = [p for p in layer.parameters() if p.requires_grad]
    exclude = {t.data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    clock = _Clock(device)
    times: dict[str, list[float]] = {"F": [], "B": [], "W": [], "full": []}
    began = time.perf_counter()
    run = 0
    saved: dict[tuple[int, int, int, Any], int] = {}
    allocated: int | None = None
    output: tuple[Tensor, ...] = ()
    single_out = True
    while run <= repeat or (timeout is not None and time.perf_counter() - began < timeout):
        first = run == 0
        leaves = tuple(stage_leaf(x, g) for x, g in zip(inputs, wants_grad))
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        clock.start()
        if first:  # the meter's view: what autograd saves, parameters excluded
            with torch.autograd.graph.saved_tensors_hooks(_packer(saved, exclude), _identity):
                result, roots, grads = _forward(layer, leaves, loss, single)
        else:
            result, roots, grads = _forward(layer, leaves, loss, single)
        forward = clock.stop()
        if first:
            output = tuple(o.detach() for o in _tensors(result))
            single_out = isinstance(result, Tensor)
            if device.type == "cuda":
                allocated = torch.cuda.memory_allocated(device) - before
        b = w = 0.0
        if roots:
            clock.start()
            _, work = backward_input(roots, grads, list(leaves), params)
            b = clock.stop()
            clock.start()
            work.run()
            w = clock.stop()
        del result, roots, grads
        leaves = tuple(stage_leaf(x, g) for x, g in zip(inputs, wants_grad))
        result, roots, grads = _forward(layer, leaves, loss, single)
        full = 0.0
        if roots:
            clock.start()
            torch.autograd.backward(roots, [torch.ones_like(r) if g is None else g for r, g in zip(roots, grads)])
            full = clock.stop()
        del result, roots, grads, leaves
        layer.zero_grad(set_to_none=True)
        if not first:
            for key, value in zip(("F", "B", "W", "full"), (forward, b, w, full)):
                times[key].append(value)
        run += 1
    input_keys = {_key(x) for x in inputs}
    output_keys = {_key(x) for x in output}
    measured = LayerProfile(
        index=index,
        name=type(original).__name__,
        forward_s=statistics.median(times["F"]),
        backward_input_s=statistics.median(times["B"]),
        backward_weight_s=statistics.median(times["W"]),
        backward_s=statistics.median(times["full"]),
        saved_bytes=sum(saved.values()),
        saved_input_bytes=sum(n for k, n in saved.items() if k in input_keys),
        saved_output_bytes=sum(n for k, n in saved.items() if k in output_keys and k not in input_keys),
        input_bytes=sum(_nbytes(x) for x in inputs),
        output_bytes=sum(_nbytes(x) for x in output),
        parameter_bytes=sum(_nbytes(t) for t in (*layer.parameters(), *layer.buffers())),
        grad_bytes=sum(_nbytes(p) for p in params),
        allocated_bytes=allocated,
    )
    return measured, output, single_out


def _forward(layer: nn.Module, leaves: tuple[Tensor, ...], loss: Any, single: bool) -> tuple[Any, list[Tensor], list[Any]]:
    """The layer's result, and the backward roots with their seeds (a loss seeds itself: ``None``)."""
    # a stage passes its input on as one value, as nn.Sequential does: a Tensor, or a tuple of them
    views = stage_views(leaves)  # the layer may start with an in-place op, as a stage may
    result = layer(views[0] if single else views)
    outs = _tensors(result)
    if loss is not None:
        loss_fn, targets = loss
        value = loss_fn(result, targets)
        roots = [value] if value.requires_grad else []
        return result, roots, [None] * len(roots)
    roots = [o for o in outs if o.requires_grad]
    return result, roots, [torch.ones_like(o) for o in roots]


def _tensors(result: Any) -> tuple[Tensor, ...]:
    if isinstance(result, Tensor):
        return (result,)
    if isinstance(result, (tuple, list)):
        return as_tensors(tuple(result), "a layer's output")
    # a traced model's last block (pipesched.tune.units): the model's own output, a mapping or ModelOutput
    return tuple(v for v in torch.utils._pytree.tree_leaves(result) if isinstance(v, Tensor))


class _Clock:
    """Seconds of one interval: wall time on the CPU, CUDA events on a GPU (device time)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._began = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self._begin.elapsed_time(end) / 1e3
        return time.perf_counter() - self._began


def _packer(saved: dict[tuple[int, int, int, Any], int], exclude: set[int]) -> Callable[[Tensor], Tensor]:
    def pack(tensor: Tensor) -> Tensor:
        if tensor.layout == torch.strided and tensor.data_ptr() not in exclude:
            saved.setdefault(_key(tensor), _nbytes(tensor))
        return tensor

    return pack


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _key(tensor: Tensor) -> tuple[int, int, int, Any]:
    """The checkpoint manager's identity of a tensor (same storage, offset, size and dtype)."""
    return (tensor.data_ptr(), tensor.storage_offset(), tensor.numel(), tensor.dtype)


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _device(module: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return resolve_device(device)
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def progress_reporter(progress: Progress, *, total: int, what: str) -> Callable[[str | None], None]:
    """``say(line)`` per unit of work, ``say(None)`` at the end.

    tqdm is used when installed and ``progress is True``; it is not a
    dependency (the plain stderr lines do the same job), so a machine
    without it loses nothing but the bar.
    """
    if not progress:
        return lambda line: None
    count = [0]

    def numbered(line: str) -> str:
        count[0] += 1
        return f"{what} [{count[0]}/{total}] {line}"

    if callable(progress) and progress is not True:
        return lambda line: None if line is None else progress(numbered(line))
    try:
        from tqdm import tqdm  # optional: a nicer bar where it is installed
    except ImportError:
        return lambda line: None if line is None else print(numbered(line), file=sys.stderr, flush=True)
    bar = tqdm(total=total, desc=what, file=sys.stderr)

    def tick(line: str | None) -> None:
        if line is None:
            bar.close()
        else:
            bar.set_postfix_str(line[:60])
            bar.update(1)

    return tick
