"""One checkpoint manager for every schedule: keep or drop activations, recompute, account bytes.

For each forward the manager decides, by policy, whether to keep what autograd
saves (fast backward, more memory) or only the stage input (the backward first
recomputes the forward under the same random draws, see :mod:`pipesched.runtime.rng`).

It also measures what it holds. The *activation bytes* of one (stage,
micro-batch) are the bytes of the distinct tensors kept for its backward:
tensors autograd saves (seen through ``saved_tensors_hooks``) except the
stage's parameters and buffers, plus the stage input it keeps. A recompute's
rebuilt tensors count while they live, i.e. during that backward. Per rank the
manager tracks the running total and its peak, and the number of micro-batches
forwarded and not yet backwarded (in flight), so a schedule's memory bound is
a measured fact.

Watching every saved tensor costs a Python call per tensor (about 1.4 µs per
pack plus an unpack; a 6-block residual MLP saves 69 per forward). So by
default (``activation_meter="once"``, :class:`MeterCache`) the bytes of a
forward are measured the first time its *signature* is seen (stage, policy,
the stage's training mode, the caller's autocast, its input shapes, dtypes and
devices) and reused for every later forward with the same signature, in this
step and later ones; those forwards run without the meter's hooks.
``activation_meter="every"`` measures every forward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn

from pipesched.runtime.caller_state import SavedTensorHooks
from pipesched.plan.action import Action
from pipesched.runtime.rng import StepRandom
from pipesched.runtime.saved_tensor_meter import SavedTensorMeter, caller_hooks
from pipesched.runtime.split_backward import WeightWork
from pipesched.runtime.stage_input import stage_leaf

CheckpointPolicy = Union[str, Callable[[int, int], bool]]
POLICIES = ("always", "except_last", "never")
#: ``activation_meter`` values: measure each forward signature once and reuse, or every forward.
METER_MODES = ("once", "every")


def check_meter_mode(mode: object) -> str:
    if mode not in METER_MODES:
        raise ValueError(
            f"activation_meter must be one of {', '.join(map(repr, METER_MODES))}, got {mode!r}; "
            f"'once' measures each forward signature once and reuses its bytes (the default), "
            f"'every' measures every forward"
        )
    return mode  # type: ignore[return-value]


def make_policy(checkpoint: object) -> Callable[[int, int, int], bool]:
    """``checkpoint`` as ``(stage, microbatch, num_microbatches) -> bool``."""
    if isinstance(checkpoint, str):
        if checkpoint == "always":
            return lambda stage, mb, count: True
        if checkpoint == "except_last":
            return lambda stage, mb, count: mb < count - 1
        if checkpoint == "never":
            return lambda stage, mb, count: False
    elif callable(checkpoint):
        return lambda stage, mb, count: bool(checkpoint(stage, mb))
    raise ValueError(
        f"checkpoint must be one of {', '.join(map(repr, POLICIES))} or a callable "
        f"(stage, microbatch) -> bool, got {checkpoint!r}"
    )


def parameter_pointers(stages: Sequence[nn.Module | None]) -> list[frozenset[int]]:
    """Per stage, the data pointers of its parameters and buffers: what is not an activation.

    ``None`` (a stage another process owns) gets an empty set.
    """
    return [
        frozenset() if stage is None
        else frozenset(t.data_ptr() for t in (*stage.parameters(), *stage.buffers()))
        for stage in stages
    ]


class LazyPointers:
    """:func:`parameter_pointers`, one stage at a time, computed when the meter first asks.

    Walking a stage's parameters costs a few µs per parameter; with the meter
    measuring each forward signature once, a steady-state step never asks.
    Each worker reads only its own stages' entries, so no lock is needed.
    """

    def __init__(self, stages: Sequence[nn.Module | None], extra: frozenset[int] = frozenset()):
        self._stages = stages
        self._extra = extra  # not activations either: this step's tied-weight replicas
        self._pointers: dict[int, frozenset[int]] = {}

    def __getitem__(self, stage: int) -> frozenset[int]:
        pointers = self._pointers.get(stage)
        if pointers is None:
            pointers = self._pointers[stage] = parameter_pointers([self._stages[stage]])[0] | self._extra
        return pointers


class MeterCache:
    """Bytes measured per forward signature, kept across a pipeline's steps (``activation_meter="once"``).

    An entry is ``[bytes, indices of the outputs the graph saved]`` (the
    second is filled by :meth:`CheckpointManager.saved_outputs`). Entries are
    written by the worker that owns the stage; dict writes are atomic.
    """

    def __init__(self) -> None:
        self.entries: dict[Any, list[Any]] = {}


def _signature(tensors: tuple[Tensor, ...]) -> tuple[Any, ...]:
    return tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in tensors)


_phase = threading.local()


def is_recomputing() -> bool:
    """True while the calling thread re-runs a checkpointed forward before its backward.

    Modules with side effects in ``forward`` (counters, running statistics,
    caches) check it so that the recompute does not apply them twice.
    """
    return getattr(_phase, "recomputing", False)


def is_checkpointing() -> bool:
    """True while the calling thread runs a checkpointed forward for the first time.

    That run has no autograd graph (``torch.no_grad``); its backward will
    recompute it, with :func:`is_recomputing` true. A forward that is not
    checkpointed has both false. (torchgpipe's flags of the same names.)
    """
    return getattr(_phase, "checkpointing", False)


@contextlib.contextmanager
def _phase_scope(flag: str) -> Iterator[None]:
    """Set ``flag`` for the calling thread, restoring the previous value on exit (scopes nest)."""
    previous = getattr(_phase, flag, False)
    setattr(_phase, flag, True)
    try:
        yield
    finally:
        setattr(_phase, flag, previous)


def _recomputing_scope() -> contextlib.AbstractContextManager[None]:
    return _phase_scope("recomputing")


def _checkpointing_scope() -> contextlib.AbstractContextManager[None]:
    return _phase_scope("checkpointing")


@dataclass
class Held:
    """What one (stage, micro-batch) keeps between its forward and its backward."""

    inputs: tuple[Tensor, ...]
    result: Any  # the forward's result with its graph, or None when checkpointed
    nbytes: int
    saved: frozenset[int] = frozenset()  # data pointers of what autograd saved (kept graphs)
    run: Callable[[tuple[Tensor, ...]], Any] | None = None  # the forward, to recompute from ``inputs``
    entry: list[Any] | None = None  # its MeterCache entry (bytes, saved output indices), if cached
    measured: bool = True  # this forward ran under the meter (``saved`` is known)


@dataclass
class RankMemory:
    """Running and peak activation bytes and in-flight micro-batches of one rank."""

    held_bytes: int = 0
    peak_bytes: int = 0
    inflight: int = 0
    peak_inflight: int = 0

    def grow(self, nbytes: int, microbatches: int = 0) -> None:
        self.held_bytes += nbytes
        self.inflight += microbatches
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        self.peak_inflight = max(self.peak_inflight, self.inflight)


@dataclass
class CheckpointManager:
    """Runs forwards and backward-time recomputes for one step and accounts their memory.

    ``exclude[stage]`` holds the data pointers of the stage's parameters and
    buffers (not activations). Each rank's worker only touches its own
    stages' entries and its own :class:`RankMemory`, so no lock is needed.
    Random draws go through ``random`` (:mod:`pipesched.runtime.rng`): a forward and
    its recompute run on the same (stage, micro-batch) stream, so no
    generator state is kept in between.
    """

    policy: Callable[[int, int, int], bool]
    num_microbatches: int
    random: StepRandom
    exclude: list[frozenset[int]]
    memory: list[RankMemory]
    user_hooks: SavedTensorHooks | None = None
    held: dict[tuple[int, int], Held] = field(default_factory=dict)
    cache: MeterCache | None = None  # None: measure every forward (activation_meter="every")
    context: Any = ()  # what else shapes a forward's saved bytes this step (training flags, autocast)
    weight_work: dict[tuple[int, int], tuple[WeightWork | None, int]] = field(default_factory=dict)

    def forward(
        self, action: Action, rank: int, inputs: tuple[Tensor, ...], run: Callable[[tuple[Tensor, ...]], Any],
        *, keep: bool,
    ) -> Any:
        """Run ``run(inputs)`` (``action``, a stage's forward on one micro-batch) for the first time.

        With ``keep`` false (no backward will follow) nothing is held. Else the
        policy decides: checkpointed runs under ``no_grad`` and keeps only
        ``inputs``; otherwise the graph is kept and its saved tensors metered.
        ``run`` is kept to repeat the forward for a checkpointed backward.
        """
        stage, microbatch = action.stage, action.microbatch
        if not keep:
            return self.random.run(stage, microbatch, run, inputs)
        checkpointed = self.policy(stage, microbatch, self.num_microbatches)
        entry = None
        if self.cache is not None:
            key = (stage, checkpointed, self.context, _signature(inputs))
            entry = self.cache.entries.get(key)
            if entry is not None:  # measured before: run without the meter's hooks
                if checkpointed:
                    with torch.no_grad(), _checkpointing_scope():
                        result = self.random.run(stage, microbatch, run, inputs, phase="checkpointed")
                else:
                    with self._user_hooks():
                        result = self.random.run(stage, microbatch, run, inputs)
                self.held[(stage, microbatch)] = Held(inputs, None if checkpointed else result, entry[0],
                                                      run=run, entry=entry, measured=False)
                self.memory[rank].grow(entry[0], microbatches=1)
                return result
        meter = SavedTensorMeter(self.exclude[stage], self.user_hooks)
        meter.add(inputs)
        if checkpointed:
            with torch.no_grad(), _checkpointing_scope():
                result = self.random.run(stage, microbatch, run, inputs, phase="checkpointed")
            kept = None
        else:
            with meter.hooks():
                result = self.random.run(stage, microbatch, run, inputs)
            kept = result
        saved = frozenset(key[0] for key in meter.seen) if kept is not None else frozenset()
        total = meter.total
        if self.cache is not None:
            entry = self.cache.entries[key] = [total, None]
        self.held[(stage, microbatch)] = Held(inputs, kept, total, saved, run, entry)
        self.memory[rank].grow(total, microbatches=1)
        return result

    def _user_hooks(self) -> contextlib.AbstractContextManager[Any]:
        """The caller's saved-tensor hooks alone (no meter; see :mod:`~pipesched.runtime.saved_tensor_meter`)."""
        return caller_hooks(self.user_hooks)

    def saved_outputs(self, stage: int, microbatch: int, outputs: tuple[Tensor, ...]) -> frozenset[int]:
        """Which of (stage, micro-batch)'s ``outputs`` its kept graph saved (their data must stay).

        Known from the meter's view of what autograd saved on a measured
        forward; a forward that reused a measurement reuses this answer too.
        """
        held = self.held.get((stage, microbatch))
        if held is None:
            return frozenset()
        entry = held.entry
        if entry is not None and entry[1] is not None:
            return entry[1]  # type: ignore[no-any-return]
        if not held.measured:  # not known (never asked on the measured forward): keep every output
            return frozenset(range(len(outputs)))
        indices = frozenset(i for i, t in enumerate(outputs) if t.data_ptr() in held.saved)
        if entry is not None:
            entry[1] = indices
        return indices

    def for_backward(self, action: Action, rank: int) -> tuple[tuple[Tensor, ...], Any]:
        """The inputs and graph-carrying result of ``action``'s forward, recomputing it if checkpointed.

        The recompute repeats the forward's ``run`` on the same random stream
        as the first run. Call :meth:`release` once the backward is done.
        """
        stage, microbatch = action.stage, action.microbatch
        held = self.held[(stage, microbatch)]
        run = held.run
        if held.result is not None:
            return held.inputs, held.result
        inputs = tuple(stage_leaf(x, x.requires_grad) for x in held.inputs)
        entry = None
        if self.cache is not None:
            key = (stage, "recompute", self.context, _signature(inputs))
            entry = self.cache.entries.get(key)
        if entry is not None:
            with torch.enable_grad(), self._user_hooks(), _recomputing_scope():
                result = self.random.run(stage, microbatch, run, inputs, phase="recompute")
            nbytes = entry[0]
        else:
            meter = SavedTensorMeter(self.exclude[stage] | {x.data_ptr() for x in held.inputs}, self.user_hooks)
            with torch.enable_grad(), meter.hooks(), _recomputing_scope():
                result = self.random.run(stage, microbatch, run, inputs, phase="recompute")
            nbytes = meter.total
            if self.cache is not None:
                self.cache.entries[key] = [nbytes, None]
        held.nbytes += nbytes
        self.memory[rank].grow(nbytes)
        return inputs, result

    def defer_weights(self, action: Action, rank: int, work: WeightWork | None) -> None:
        """B of a split backward is done: keep only what its W needs, until W.

        The (stage, micro-batch) stays in flight, and the bytes W keeps stay
        counted, until :meth:`weights` hands the work to W.
        """
        held = self.held.pop((action.stage, action.microbatch))
        kept = 0 if work is None else work.nbytes()
        self.weight_work[(action.stage, action.microbatch)] = (work, kept)
        self.memory[rank].grow(kept - held.nbytes)

    def weights(self, action: Action, rank: int) -> WeightWork | None:
        """W's work for (stage, micro-batch) (``None``: nothing to do); it leaves the books now."""
        work, kept = self.weight_work.pop((action.stage, action.microbatch))
        self.memory[rank].grow(-kept, microbatches=-1)
        return work

    def release(self, action: Action, rank: int) -> None:
        """Forget everything ``action``'s (stage, micro-batch) held; its backward is done."""
        held = self.held.pop((action.stage, action.microbatch))
        self.memory[rank].grow(-held.nbytes, microbatches=-1)

    def discard(self) -> None:
        """The step failed: drop every graph still held and every W not yet run (:meth:`WeightWork.release`).

        The step's context outlives it (a raised error's traceback holds it,
        and a worker thread its last job), so without this a failed step's
        graphs would stay alive until the next step. Entries are popped one
        at a time: a task left stuck by a stalled step may still add one.
        """
        while self.weight_work:
            work, _ = self.weight_work.popitem()[1]
            if work is not None:
                work.release()
        while self.held:
            self.held.popitem()

