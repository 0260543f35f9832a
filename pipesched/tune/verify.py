"""Run the tuner's best candidates for real, side by side, and say where the prediction was wrong.

The candidates are measured in *interleaved* rounds: every round steps each
candidate once, in a rotating order, after one untimed warm-up round (thread
start-up, allocator, first touch). A machine that slows down for a moment
slows every candidate's round alike, instead of whichever one was running;
each figure is the median of the rounds, and the spread (slowest - fastest)
/ median says how far to trust it. A candidate whose prediction is off by
more than :data:`PREDICTION_TOLERANCE` of its measured time draws a warning:
the ranking of the rest rests on the same profile.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from torch import nn

from pipesched.pipeline import Pipeline
from pipesched.tune.candidate import Candidate
from pipesched.tune.measure import Progress, progress_reporter

__all__ = ["PREDICTION_TOLERANCE", "measure_candidates", "measured_peak_bytes"]

#: |predicted - measured| / measured above which the tuner warns.
PREDICTION_TOLERANCE = 0.15


def measure_candidates(chosen: Sequence[Candidate], module: nn.Module, inputs: Any, targets: Any, loss_fn: Any,
                       progress: Progress, rounds: int = 5) -> None:
    """Set ``measured_step_s`` / ``measured_spread`` / ``measured_peak_bytes`` of each of ``chosen``."""
    from pipesched.tune.unpipelined import unpipelined_step  # beside this module: no cycle at import

    say = progress_reporter(progress, total=len(chosen), what="tune: measure")
    times: list[list[float]] = [[] for _ in chosen]
    with ExitStack() as stack:
        steps: list[Callable[[], None]] = []
        pipes: list[Pipeline | None] = []
        for candidate in chosen:
            model = copy.deepcopy(module)
            if candidate.pipelined:
                pipe = stack.enter_context(Pipeline(model, **candidate.pipeline_kwargs(), loss_fn=loss_fn))
                steps.append(_pipeline_step(model, pipe, inputs, targets))
                pipes.append(pipe)
            else:
                steps.append(unpipelined_step(model, inputs, targets, loss_fn, candidate.chunks,
                                              candidate.devices[0]))
                pipes.append(None)
        for step in steps:  # the warm-up round, untimed
            step()
        order = list(range(len(chosen)))
        for r in range(rounds):
            shift = r % len(order)
            for index in order[shift:] + order[:shift]:
                began = time.perf_counter()
                steps[index]()
                times[index].append(time.perf_counter() - began)
        for candidate, pipe, seconds in zip(chosen, pipes, times):
            candidate.measured_step_s = statistics.median(seconds)
            candidate.measured_spread = (max(seconds) - min(seconds)) / candidate.measured_step_s
            if pipe is not None:
                candidate.measured_peak_bytes = measured_peak_bytes(pipe)
            say(f"{candidate.label}: {candidate.measured_step_s * 1e3:.1f} ms "
                f"(predicted {candidate.predicted_step_s * 1e3:.1f} ms)")
    say(None)
    for candidate in chosen:
        error = candidate.prediction_error
        if error is not None and abs(error) > PREDICTION_TOLERANCE:
            warnings.warn(
                f"tune: {candidate.label} was predicted at {candidate.predicted_step_s * 1e3:.1f} ms and measured "
                f"at {candidate.measured_step_s * 1e3:.1f} ms ({error:+.0%}, spread "
                f"{candidate.measured_spread:.0%}); the ranking of the unmeasured candidates rests on the same "
                f"profile: measure more of them (measure=k) or profile with a larger repeat=",
                UserWarning, stacklevel=3)


def _pipeline_step(model: nn.Module, pipe: Pipeline, inputs: Any, targets: Any) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        pipe.step(inputs, targets)
    return step


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
