"""``tune`` against what it replaces: not pipelining, its own measurements, and itself run twice.

Sleep layers (:mod:`benchmarks.sleep_layers`) give known costs; assertions rest
on large ratios or on exact ties the ranking breaks by a rule, never on fine
timing margins.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pipesched
from benchmarks.sleep_layers import SleepLayer, sleep_model
from pipesched.runtime.cpu_threads import cores_per_rank
from pipesched.tune import LayerProfile, Profile


class ThreadSpy(nn.Module):
    """Records ``torch.get_num_threads()`` at every forward, wherever it runs."""

    seen: list[int] = []

    def forward(self, x):
        ThreadSpy.seen.append(torch.get_num_threads())
        return x * 1.0


def top(result, k=3):
    return [(c.schedule, c.chunks, c.checkpoint) for c in result.candidates[:k]]


def test_tune_measures_with_one_share_of_the_cores_per_rank_and_restores_the_callers_threads():
    model = nn.Sequential(ThreadSpy(), SleepLayer(1e-4, 1e-4, 1e-4), ThreadSpy(), SleepLayer(1e-4, 1e-4, 1e-4))
    x, y = torch.zeros(4, 1), torch.zeros(4, 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        ThreadSpy.seen.clear()
        result = pipesched.tune(model, x, y, nn.MSELoss(), devices=["cpu"] * 2, schedules=["1f1b"], chunks=[2],
                                checkpoint=["never"], repeat=1, measure=2)
        assert torch.get_num_threads() == 3  # the caller's setting, back
    finally:
        torch.set_num_threads(previous)
    share = cores_per_rank(2)
    assert result.threads == share and ThreadSpy.seen and set(ThreadSpy.seen) == {share}
    assert all(c.measured_step_s is not None and c.measured_spread is not None for c in result.candidates[:2])


def test_tune_says_dont_pipeline_when_the_plain_model_is_as_fast():
    """One micro-batch on two ranks runs the stages one after the other: the same work as the plain
    model, plus the engine. The plain model ranks first and the advice says so."""
    model = sleep_model([0.0, 0.0], fixed_ms=4.0)
    x, y = torch.zeros(2, 1), torch.zeros(2, 1)
    result = pipesched.tune(model, x, y, nn.MSELoss(), devices=["cpu"] * 2, schedules=["gpipe"], chunks=[1],
                            checkpoint=["never"], repeat=3, measure=0)
    assert not result.best.pipelined and result.best.chunks == 1
    assert result.advice is not None and result.advice.startswith("don't pipeline: no pipeline")
    assert result.best_pipelined.schedule == "gpipe"
    assert "don't pipeline" in result.format_table() and "# no pipeline" in result.best.pipeline_line()
    with pytest.raises(ValueError, match="result.best_pipelined"):
        result.best.pipeline_kwargs()


def test_gradient_accumulation_candidate_gives_the_whole_batch_gradients():
    from pipesched.tune.unpipelined import unpipelined_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    nn.MSELoss()(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    unpipelined_step(model, x, y, nn.MSELoss(), 3, "cpu")()  # uneven: 3, 2, 2 rows
    for param, want in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, want, rtol=0, atol=1e-12)


def test_tune_warns_when_a_measured_candidate_is_far_from_its_prediction():
    """A profile of a model 10x lighter predicts a tenth of the real time: the measurement says so."""
    light, heavy = sleep_model([0.2, 0.2]), sleep_model([2.0, 2.0])
    x, y = torch.zeros(4, 1), torch.zeros(4, 1)
    wrong = pipesched.profile(light, x[:2], y[:2], nn.MSELoss(), repeat=3)
    with pytest.warns(UserWarning, match=r"was predicted at .* and measured at"):
        result = pipesched.tune(heavy, x, y, nn.MSELoss(), devices=["cpu"] * 2, schedules=["1f1b"], chunks=[2],
                                checkpoint=["never"], profile=[wrong], measure=1, unpipelined=False)
    assert result.best.prediction_error < -0.15


def sleep_profile(rows: int, noise: float) -> Profile:
    """What profiling two layers of F = B = W = 5 ms per row gives, each figure off by up to ``noise``."""
    def off(i: int, seconds: float) -> float:
        return seconds * (1 + noise * (-1) ** i)

    layers = [LayerProfile(index=i, name="SleepLayer", forward_s=off(i, 5e-3 * rows),
                           backward_input_s=off(i + 1, 5e-3 * rows), backward_weight_s=off(i, 5e-3 * rows),
                           backward_s=off(i + 1, 10e-3 * rows), saved_bytes=0, saved_input_bytes=0,
                           saved_output_bytes=0, input_bytes=4 * rows, output_bytes=4 * rows, parameter_bytes=4,
                           grad_bytes=4) for i in range(2)]
    return Profile(rows=rows, device="cpu", repeat=5, input_requires_grad=False, loss=True, layers=layers)


def test_two_consecutive_tune_calls_agree_on_the_top_3():
    """Two calls whose profiles differ by the noise of a quiet machine (+-4 %, opposite signs) rank the same
    top 3: zb-h1, then 1f1b and gpipe at 8 micro-batches (an exact tie, broken by a rule, not by noise).
    The engine's cost per task is fixed: measured on a shared machine it moves between calls (the
    benchmark measures it)."""
    model = sleep_model([5.0, 5.0])
    x, y = torch.zeros(8, 1), torch.zeros(8, 1)
    options = dict(devices=["cpu"] * 2, schedules=["gpipe", "1f1b", "zb-h1"], chunks=[1, 8],
                   checkpoint=["never"], measure=0, engine_overhead_s=2e-4)
    first = pipesched.tune(model, x, y, nn.MSELoss(), profile=[sleep_profile(r, 0.04) for r in (1, 8)], **options)
    second = pipesched.tune(model, x, y, nn.MSELoss(), profile=[sleep_profile(r, -0.04) for r in (1, 8)],
                            **options)
    assert top(first) == top(second) == [("zb-h1", 8, "never"), ("1f1b", 8, "never"), ("gpipe", 8, "never")]


@pytest.mark.parametrize("noise", [-0.01, 0.0, 0.01])
def test_a_near_tie_ranks_the_simpler_candidate_first_whichever_way_noise_tips_it(noise):
    from pipesched.tune.candidate import Candidate
    from pipesched.tune.search import _ranked

    def candidate(schedule, chunks, seconds):
        return Candidate(schedule, [1, 1], chunks, "never", ["cpu", "cpu"], seconds, [0, 0])

    many = candidate("zb-h1", 8, 0.100 * (1 + noise))
    few = candidate("1f1b", 4, 0.100 * (1 - noise))
    slow = candidate("gpipe", 2, 0.130)
    assert [c.chunks for c in _ranked([slow, many, few])] == [4, 8, 2]
