"""``pipesched.tune``: which schedule, how many micro-batches, checkpoint or not, where to cut, under a budget.

::

    result = pipesched.tune(model, x, y, nn.CrossEntropyLoss(), devices=["cpu"] * 4,
                            memory_budget=2 * 2**30)
    print(result.format_table())
    pipe = Pipeline(model, **result.best.pipeline_kwargs(), loss_fn=nn.CrossEntropyLoss())

For every schedule × chunks × checkpoint policy it cuts the model exactly for
the schedule's placement (:func:`pipesched.plan.balance.balance_ranks` on the
profile's per-layer cost), predicts the step time with the simulator and the
peak bytes per rank from the plan (:mod:`pipesched.tune.predict` says what is
counted), drops what exceeds ``memory_budget`` to the bottom, and ranks the
rest by predicted time. ``measure=k`` then runs the ``k`` best for real and
puts them first, ranked by measured time.

Profiles: one per micro-batch size the candidates run (cost is not linear in
rows), measured on ``devices[0]``, or taken from ``profile=`` where a given
profile has that size.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pipesched.pipeline import Pipeline
from pipesched.plan.balance import balance_ranks
from pipesched.plan.registry import get_schedule, schedules_for
from pipesched.plan.schedule import validate_placement
from pipesched.runtime.checkpoint import POLICIES
from pipesched.runtime.microbatch import as_tensors, batch_size, split_sizes
from pipesched.runtime.partition import default_devices, resolve_device
from pipesched.tune.costs import Profile
from pipesched.tune.measure import Progress, _profile, progress_reporter
from pipesched.tune.predict import predict
from pipesched.tune.report import format_bytes, format_table
from pipesched.tune.units import block_units

__all__ = ["Candidate", "TuneResult", "measured_peak_bytes", "tune"]


@dataclass
class Candidate:
    """One configuration and what it costs. Seconds; bytes per rank (rank 0 first)."""

    schedule: str
    balance: list[int]
    chunks: int
    checkpoint: str
    devices: list[str]
    predicted_step_s: float
    predicted_peak_bytes: list[int]
    predicted_bubble: float = 0.0
    fits: bool = True
    measured_step_s: float | None = None
    measured_peak_bytes: list[int] | None = None

    def pipeline_kwargs(self) -> dict[str, Any]:
        """``Pipeline(model, **candidate.pipeline_kwargs(), loss_fn=...)``."""
        return {"schedule": self.schedule, "balance": list(self.balance), "devices": list(self.devices),
                "chunks": self.chunks, "checkpoint": self.checkpoint}

    def pipeline_line(self, model: str = "model", loss_fn: str = "loss_fn") -> str:
        """The ``Pipeline(...)`` call for this candidate, as Python source."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.pipeline_kwargs().items())
        return f"Pipeline({model}, {args}, loss_fn={loss_fn})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TuneResult:
    """What :func:`tune` found: ``candidates`` best first (fitting ones, measured ones first), ``best``.

    ``skipped`` lists the (schedule, chunks, reason) shapes a schedule refused;
    ``profiles`` the profile used for each micro-batch size.
    """

    candidates: list[Candidate]
    memory_budget: int | None
    batch: int
    skipped: list[tuple[str, int, str]] = field(default_factory=list)
    profiles: dict[int, Profile] = field(default_factory=dict)

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def format_table(self, top: int | None = 10) -> str:
        return format_table(self, top)

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory_budget": self.memory_budget,
            "batch": self.batch,
            "best": self.best.as_dict(),
            "pipeline": self.best.pipeline_line(),
            "candidates": [c.as_dict() for c in self.candidates],
            "skipped": [{"schedule": s, "chunks": m, "reason": r} for s, m, r in self.skipped],
            "profiles": {str(rows): p.to_dict() for rows, p in sorted(self.profiles.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=True)


def tune(
    module: nn.Module,
    inputs: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor],
    targets: Any,
    loss_fn: Callable[[Any, Any], Tensor],
    *,
    devices: Sequence[str | int | torch.device] | int,
    memory_budget: int | None = None,
    schedules: Sequence[str] | None = None,
    chunks: Sequence[int] | None = None,
    checkpoint: Sequence[str] | None = None,
    profile: Profile | Sequence[Profile] | None = None,
    measure: int = 0,
    repeat: int = 3,
    progress: Progress = None,
) -> TuneResult:
    """Search schedule × chunks × checkpoint × balance for ``module`` on ``devices``; see the module docstring.

    Args:
        module: the ``nn.Sequential`` to pipeline, or any model ``Pipeline`` traces and cuts (a
            Hugging Face LLM), whose layers are then the blocks of its block list, as ``balance=``
            counts them (:mod:`pipesched.tune.units`); not modified (measurements run on copies).
        inputs, targets, loss_fn: one batch of the size you will train with, and the loss (a
            traced model's inputs: a dict of keyword tensors).
        devices: one device per rank, or a rank count (CUDA devices round-robin, else CPU ranks).
        memory_budget: bytes per rank (activations + parameters + gradients, see
            :mod:`pipesched.tune.predict`); ``None``: no limit.
        schedules: names to search (default: every registered schedule whose plan builds on
            these ranks and whose stage count the module has layers for).
        chunks: micro-batch counts to search (default: powers of two up to the batch size).
        checkpoint: policies to search (default: ``"never"``, ``"except_last"``, ``"always"``).
        profile: profiles to reuse (matched by micro-batch size); the missing sizes are measured.
        measure: run this many of the best fitting candidates for real and rank them first by
            their measured step time (median of 3 steps after one warm-up).
        repeat: timed runs per layer when profiling.
        progress: ``True`` for progress on stderr (tqdm if installed), or a callback per line.

    Raises:
        ValueError: bad arguments, no candidate the schedules accept, or none within
            ``memory_budget`` (the message names the smallest predicted peak).
    """
    layers, layer_inputs = _layers(module, inputs)
    tensors = as_tensors(layer_inputs, "inputs")
    rows = batch_size(tensors, "inputs")
    ranks = _devices(devices)
    budget = _budget(memory_budget)
    names = _schedules(schedules, len(ranks), len(layers))
    counts = _chunks(chunks, rows)
    policies = _policies(checkpoint)
    if isinstance(measure, bool) or not isinstance(measure, int) or measure < 0:
        raise ValueError(f"measure must be an int >= 0 (candidates to run for real), got {measure!r}")
    profiles = _given_profiles(profile, len(layers))
    device_names = [str(d) for d in ranks]

    needed = sorted({size for m in counts for size in split_sizes(rows, m)} - set(profiles))
    say = progress_reporter(progress, total=len(needed), what="tune: profile")
    for size in needed:
        micro = _rows(layer_inputs, size)
        profiles[size] = _profile(layers, micro, _rows(targets, size), loss_fn, device=ranks[0],
                                  repeat=repeat, timeout=None, progress=None)
        say(f"micro-batch of {size} rows")
    say(None)

    candidates, skipped = [], []
    balances: dict[tuple[Any, ...], list[int]] = {}
    for name in names:
        schedule = get_schedule(name)
        stages = schedule.default_num_stages(len(ranks))
        try:
            placement = validate_placement(schedule.placement(stages, len(ranks)), stages, len(ranks))
        except ValueError as error:
            skipped.append((name, 0, str(error)))
            continue
        for m in counts:
            sizes = split_sizes(rows, m)
            for policy in policies:
                recompute = policy != "never"
                key = (tuple(placement), max(sizes), recompute)
                if key not in balances:
                    costs = profiles[max(sizes)].layer_costs(recompute=recompute)
                    balances[key] = balance_ranks(costs, placement).balance
                balance = balances[key]
                try:
                    guess = predict(schedule, balance, len(ranks), sizes, profiles, policy)
                except ValueError as error:
                    skipped.append((name, m, str(error).splitlines()[0]))
                    break
                fits = budget is None or max(guess.peak_bytes) <= budget
                candidates.append(Candidate(name, balance, len(sizes), policy, device_names, guess.step_s,
                                            guess.peak_bytes, guess.bubble, fits))
    if not candidates:
        raise ValueError(
            "no candidate: every schedule refused every micro-batch count ("
            + "; ".join(f"{s} m={m}: {r}" for s, m, r in skipped[:3]) + "); widen schedules= or chunks="
        )
    candidates.sort(key=_rank_key)
    if not candidates[0].fits:
        smallest = min(candidates, key=lambda c: max(c.predicted_peak_bytes))
        raise ValueError(
            f"no candidate fits memory_budget={budget} bytes ({format_bytes(budget)}) per rank; the smallest "
            f"predicted peak is {format_bytes(max(smallest.predicted_peak_bytes))} ({smallest.schedule}, "
            f"chunks={smallest.chunks}, checkpoint={smallest.checkpoint!r}): raise the budget, add ranks, "
            f"or allow checkpoint='always' and more chunks"
        )
    result = TuneResult(candidates, budget, rows, skipped, profiles)
    if measure:
        _measure(result, module, inputs, targets, loss_fn, measure, progress)
    return result


def _layers(module: nn.Module, inputs: Any) -> tuple[nn.Sequential, Any]:
    """What is profiled and balanced: an ``nn.Sequential``'s layers, or a traced model's blocks."""
    if isinstance(module, nn.Sequential):
        if len(module) == 0:
            raise TypeError("module is an empty nn.Sequential; give it at least one layer")
        return module, inputs
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module (an nn.Sequential, or a model Pipeline traces), "
                        f"got {type(module).__name__}")
    return block_units(module, inputs)


def _rank_key(c: Candidate) -> tuple[Any, ...]:
    """Fitting first; measured first, by measured time; the rest by predicted time; then fewer chunks."""
    measured = c.measured_step_s is not None
    time_key = c.measured_step_s if measured else c.predicted_step_s
    return (not c.fits, not measured, time_key, c.chunks, POLICIES.index(c.checkpoint), c.schedule)


def _measure(result: TuneResult, module: nn.Module, inputs: Any, targets: Any, loss_fn: Any, k: int,
             progress: Progress, steps: int = 3) -> None:
    """Run the ``k`` best fitting candidates for real; record median step time and measured peak bytes."""
    chosen = [c for c in result.candidates if c.fits][:k]
    say = progress_reporter(progress, total=len(chosen), what="tune: measure")
    for candidate in chosen:
        model = copy.deepcopy(module)
        times = []
        with Pipeline(model, **candidate.pipeline_kwargs(), loss_fn=loss_fn) as pipe:
            for step in range(1 + steps):
                model.zero_grad(set_to_none=True)
                began = time.perf_counter()
                pipe.step(inputs, targets)
                if step:
                    times.append(time.perf_counter() - began)
            candidate.measured_peak_bytes = measured_peak_bytes(pipe)
        candidate.measured_step_s = statistics.median(times)
        say(f"{candidate.schedule} chunks={candidate.chunks} checkpoint={candidate.checkpoint}: "
            f"{candidate.measured_step_s * 1e3:.1f} ms")
    say(None)
    result.candidates.sort(key=_rank_key)


def measured_peak_bytes(pipe: Pipeline) -> list[int]:
    """Per rank, after a step: ``last_report``'s peak activation bytes + its stages' parameters, buffers, grads.

    The same quantities the prediction counts, measured (gradients: one per
    parameter that requires grad, whether or not ``.grad`` is set now).
    """
    report = pipe.last_report
    if report is None:
        raise ValueError("the pipeline has not run a step yet; call pipe.step(...) first")
    static = [0] * pipe.num_ranks
    for stage, rank in zip(pipe.stages, pipe.placement):
        tensors = [*stage.parameters(), *stage.buffers()]
        static[rank] += sum(t.numel() * t.element_size() for t in tensors)
        static[rank] += sum(p.numel() * p.element_size() for p in stage.parameters() if p.requires_grad)
    return [a + s for a, s in zip(report.peak_activation_bytes, static)]


# ------------------------------------------------------------------ arguments


def _devices(devices: Any) -> list[torch.device]:
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"devices must be a list of devices or a rank count >= 1, got {devices}")
        return default_devices(devices)
    if isinstance(devices, (str, bytes, torch.device)) or not isinstance(devices, Sequence) or not devices:
        raise ValueError(f"devices must be a non-empty list (one device per rank) or a rank count, got {devices!r}")
    return [resolve_device(d, i) for i, d in enumerate(devices)]


def _budget(memory_budget: Any) -> int | None:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) \
            or not math.isfinite(memory_budget) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a number of bytes > 0 per rank (or None), got {memory_budget!r}")
    return int(memory_budget)


def _schedules(schedules: Any, ranks: int, layers: int) -> list[str]:
    if schedules is None:
        return [name for name, stages in schedules_for(ranks) if stages <= layers]
    if isinstance(schedules, str) or not isinstance(schedules, Sequence) or not schedules:
        raise ValueError(f"schedules must be a non-empty list of schedule names, got {schedules!r}")
    names = []
    for name in schedules:
        schedule = get_schedule(name)  # unknown names: the registry's error lists the known ones
        stages = schedule.default_num_stages(ranks)
        if stages > layers:
            raise ValueError(
                f"schedule {name!r} on {ranks} ranks needs {stages} stages, but the module has {layers} "
                f"layers; drop it from schedules= or use fewer ranks"
            )
        names.append(schedule.name if schedule.name != "custom" else name)
    return list(dict.fromkeys(names))


def _chunks(chunks: Any, rows: int) -> list[int]:
    if chunks is None:
        return [2**i for i in range(rows.bit_length()) if 2**i <= rows]
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence) or not chunks:
        raise ValueError(f"chunks must be a non-empty list of micro-batch counts, got {chunks!r}")
    for m in chunks:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"chunks holds {m!r}; every micro-batch count must be an int >= 1")
        if m > rows:
            raise ValueError(f"chunks holds {m}, more than the batch's {rows} rows; every micro-batch needs a row")
    return sorted(set(chunks))


def _policies(checkpoint: Any) -> list[str]:
    if checkpoint is None:
        return list(POLICIES)
    if isinstance(checkpoint, str):
        checkpoint = [checkpoint]
    if not isinstance(checkpoint, Sequence) or not checkpoint:
        raise ValueError(f"checkpoint must be a list of policy names from {POLICIES}, got {checkpoint!r}")
    for policy in checkpoint:
        if policy not in POLICIES:
            raise ValueError(f"checkpoint holds {policy!r}; the tuner searches the named policies {POLICIES}")
    return list(dict.fromkeys(checkpoint))


def _given_profiles(profile: Any, layers: int) -> dict[int, Profile]:
    if profile is None:
        return {}
    given = [profile] if isinstance(profile, Profile) else list(profile)
    out = {}
    for index, item in enumerate(given):
        if not isinstance(item, Profile):
            raise TypeError(f"profile[{index}] is a {type(item).__name__}; pass pipesched.Profile objects")
        if len(item) != layers:
            raise ValueError(f"profile[{index}] has {len(item)} layers, the module {layers}: it is another model's")
        out[item.rows] = item
    return out


def _rows(value: Any, rows: int) -> Any:
    """The first ``rows`` rows of a batch (a Tensor, a tuple/list or a dict of them); anything else as is."""
    if isinstance(value, Tensor):
        return value[:rows]
    if isinstance(value, Mapping):
        return {k: _rows(v, rows) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows) for v in value)
    return value
