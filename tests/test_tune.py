"""pipesched.profile, pipesched.balance and pipesched.tune on layers of known cost and real memory.

Time assertions use large cost ratios (a layer sleeping 8x another), never
fine margins, so a loaded machine cannot flip them. Memory assertions compare
the predictor with what the pipeline's own meter measures in a real step.
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
from pipesched import Pipeline
from pipesched.balance import balance_by_size, balance_by_time
from pipesched.plan.registry import get_schedule
from pipesched.runtime.microbatch import split_sizes
from pipesched.tune import Profile
from pipesched.tune.predict import predict
from pipesched.tune.report import parse_bytes
from pipesched.tune.search import TIE, measured_peak_bytes


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))


# ------------------------------------------------------------------ profile


def test_profile_measures_each_half_of_the_backward_of_sleep_layers():
    """F, B and W of a layer sleeping 1/16/4 ms per row are told apart (4x ratios; medians of 3)."""
    model = nn.Sequential(SleepLayer(0.0, 0.0, 4e-3), SleepLayer(1e-3, 16e-3, 4e-3))
    x = torch.zeros(2, 1)
    profile = pipesched.profile(model, x, repeat=3)
    light, heavy = profile.layers
    assert profile.rows == 2 and len(profile) == 2 and not profile.input_requires_grad
    assert heavy.backward_input_s > 2 * heavy.backward_weight_s > 2 * heavy.forward_s  # 32 : 8 : 2 ms
    assert heavy.backward_s > 2 * heavy.backward_weight_s  # the whole backward runs both halves: 40 ms
    # the first layer's input needs no gradient: its B has no input path, its W is the whole backward
    assert light.backward_input_s < 0.25 * light.backward_weight_s  # nothing : 8 ms
    first = profile.stage(0, 2)
    assert first.backward_input_s == 0.0 and first.backward_weight_s == pytest.approx(first.backward_s)


def test_profile_at_the_micro_batch_size_scales_with_rows():
    model = nn.Sequential(SleepLayer(4e-3, 0.0, 0.0))
    small = pipesched.profile(model, torch.zeros(1, 1), repeat=3).layers[0].forward_s
    large = pipesched.profile(model, torch.zeros(8, 1), repeat=3).layers[0].forward_s
    assert large > 2 * small  # 8x nominal


def test_profile_bytes_and_json_round_trip():
    model = mlp()
    x, y = torch.randn(8, 16), torch.randint(0, 8, (8,))
    profile = pipesched.profile(model, x, y, nn.CrossEntropyLoss(), repeat=1)
    first = profile.layers[0]
    assert first.input_bytes == 8 * 16 * 4 and first.output_bytes == 8 * 64 * 4
    assert first.saved_input_bytes == first.input_bytes  # Linear saves its input
    assert first.parameter_bytes == (16 * 64 + 64) * 4 == first.grad_bytes
    assert profile.layers[1].saved_output_bytes == 8 * 64 * 4  # ReLU saves its result
    assert profile.loss and profile.layers[-1].saved_bytes > profile.layers[-1].saved_input_bytes  # the loss's
    again = Profile.from_json(profile.to_json())
    assert again == profile
    assert again.stages([3, 4]) == profile.stages([3, 4])
    with pytest.raises(ValueError, match="not a pipesched profile"):
        Profile.from_json('{"rows": 1}')


def test_profile_leaves_the_model_alone():
    model = mlp()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipesched.profile(model, torch.randn(4, 16), torch.randint(0, 8, (4,)), nn.CrossEntropyLoss(), repeat=1)
    assert all(p.grad is None for p in model.parameters())
    assert not any(layer.training for layer in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_profile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="repeat must be an int >= 1"):
        pipesched.profile(mlp(), torch.randn(2, 16), repeat=0)
    with pytest.raises(ValueError, match="loss_fn needs targets"):
        pipesched.profile(mlp(), torch.randn(2, 16), loss_fn=nn.MSELoss())
    with pytest.raises(TypeError, match="nn.Sequential"):
        pipesched.profile(nn.Linear(2, 2), torch.randn(2, 2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_on_cuda_uses_events_and_the_allocator():
    model = mlp()
    profile = pipesched.profile(model, torch.randn(8, 16), device="cuda", repeat=2)
    assert profile.device.startswith("cuda")
    assert all(layer.allocated_bytes is not None for layer in profile.layers)
    assert profile.layers[0].allocated_bytes >= profile.layers[0].output_bytes
    assert next(model.parameters()).device.type == "cpu"


# ------------------------------------------------------------------ balance


def test_balance_by_time_isolates_a_heavy_head():
    """Seven layers that do not sleep and a head of 3 x 20 ms: two stages cut before the head, whatever the noise."""
    model = sleep_model([0.0] * 7 + [20.0])
    assert balance_by_time(2, model, torch.zeros(1, 1), timeout=0.0, device="cpu") == [7, 1]


def test_balance_by_time_torchgpipe_case():
    """torchgpipe's own test: delays of 1..6 units in two partitions: [4, 2] (10 | 11 units; the next best
    cut's larger part is 15). A unit is 3 sleeps of 4 ms; each layer's median over the repetitions a
    1 s budget allows, so that one late wake-up on a loaded machine (one run each flipped the cut
    under a CPU hog) does not decide."""
    model = sleep_model([4.0, 8.0, 12.0, 16.0, 20.0, 24.0])
    assert balance_by_time(2, model, torch.zeros(1, 1), timeout=1.0, device="cpu") == [4, 2]


def test_balance_by_time_per_rank_for_a_v_schedule():
    """ZB-V puts stages 0 and 3 on rank 0: with a heavy first layer, rank 0's stages are it and one light layer.

    (The light layers do not sleep: any extra layer on rank 0 only adds to the busiest rank.)
    """
    model = sleep_model([24.0] + [0.0] * 11)
    balance = balance_by_time(2, model, torch.zeros(1, 1), timeout=0.0, device="cpu", schedule="zb-v")
    assert len(balance) == 4 and sum(balance) == 12
    assert balance[0] == 1 and balance[3] == 1  # rank 0: the head + one light layer; rank 1: ten
    plain = balance_by_time(4, model, torch.zeros(1, 1), timeout=0.0, device="cpu")
    assert plain[0] == 1 and plain[3] > 1  # blind to the placement: rank 0 gets the head and a full quarter


class Modes(list):
    """A list of modes that a deep copy shares, so the profiler's copies of a layer write to it too."""

    def __deepcopy__(self, memo):
        return self


class ModeSpy(nn.Module):
    """Records the mode of every forward it runs (the copy the profiler times included), in one shared list."""

    def __init__(self, seen: Modes, fail: bool = False):
        super().__init__()
        self.seen, self.fail = seen, fail

    def forward(self, x):
        self.seen.append(self.training)
        if self.fail:
            raise RuntimeError("a layer that fails while profiled")
        return x * 2


def test_balance_by_time_profiled_a_model_left_in_eval_in_eval_mode():
    """torchgpipe times layers in training mode whatever mode the model was left in, and gives the model
    back in its own modes, part by part (here: in eval, but its second layer in training)."""
    seen = Modes()
    model = nn.Sequential(ModeSpy(seen), nn.Sequential(ModeSpy(seen), nn.Dropout(0.5))).eval()
    model[1].train()
    model[1][1].eval()
    before = [m.training for m in model.modules()]
    assert balance_by_time(2, model, torch.ones(2, 3), timeout=0.0, device="cpu") == [1, 1]
    assert seen and all(seen), seen  # every profiled forward ran in training mode
    assert [m.training for m in model.modules()] == before
    seen.clear()
    assert balance_by_size(2, model, torch.ones(2, 3), device="cpu") and seen and all(seen)
    assert [m.training for m in model.modules()] == before
    failing = nn.Sequential(ModeSpy(seen), ModeSpy(seen, fail=True)).eval()
    with pytest.raises(RuntimeError, match="fails while profiled"):
        balance_by_time(2, failing, torch.ones(2, 3), timeout=0.0, device="cpu")
    assert not any(m.training for m in failing.modules())  # restored on the way out of an error too


def test_balance_by_time_did_not_refuse_parameters_holding_gradients():
    """torchgpipe's balance_by_time raises "some parameter already has gradient" (its profile_times); so do we,
    naming the parameters and the fix. Cleared gradients (None) are fine."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model(torch.ones(2, 3)).sum().backward()
    with pytest.raises(ValueError, match=r"some parameter already has gradient: module's '0.weight', '0.bias', "
                                         r"'1.weight' and 1 more .* module.zero_grad\(set_to_none=True\)"):
        balance_by_time(2, model, torch.ones(2, 3), timeout=0.0, device="cpu")
    model.zero_grad(set_to_none=True)
    assert balance_by_time(2, model, torch.ones(2, 3), timeout=0.0, device="cpu") == [1, 1]


def test_balance_by_size_follows_parameters_and_activations():
    """torchgpipe's case: Linear layers of growing size; with param_scale large, the parameters decide
    (4 + 9 + 16 + 25 | 36 + 49 parameters is the optimal cut)."""
    model = nn.Sequential(*[nn.Linear(i + 1, i + 2) for i in range(6)])
    assert balance_by_size(2, model, torch.randn(7, 1), param_scale=100.0, device="cpu") == [4, 2]
    reversed_model = nn.Sequential(*[nn.Linear(i + 2, i + 1) for i in reversed(range(6))])
    assert balance_by_size(2, reversed_model, torch.randn(1, 7), param_scale=100.0, device="cpu") == [2, 4]


def test_balance_refuses_bad_arguments():
    with pytest.raises(ValueError, match="cannot cut a module of 2 layers into 3"):
        balance_by_time(3, sleep_model([1.0, 1.0]), torch.zeros(1, 1), device="cpu")
    with pytest.raises(ValueError, match="chunks must be a positive int"):
        balance_by_size(2, mlp(), torch.randn(2, 16), chunks=0, device="cpu")
    with pytest.raises(ValueError, match="needs 8 stages"):
        balance_by_time(4, sleep_model([1.0] * 5), torch.zeros(1, 1), timeout=0.0, device="cpu",
                        schedule="interleaved-1f1b")


# ------------------------------------------------------------------ memory prediction


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b"])
@pytest.mark.parametrize("checkpoint", ["never", "except_last", "always"])
def test_predicted_peak_bytes_equal_the_measured_for_unsplit_backwards(schedule, checkpoint, chunks=3):
    """Activation bytes walked along the plan are the checkpoint manager's measured peak, byte for byte
    (3 micro-batches of 32 rows: uneven sizes, each priced from its own profile)."""
    model, x, y, loss = mlp(), torch.randn(32, 16), torch.randint(0, 8, (32,)), nn.CrossEntropyLoss()
    plan_schedule = get_schedule(schedule)
    stages = plan_schedule.default_num_stages(2)
    sizes = split_sizes(32, chunks)
    profiles = {rows: pipesched.profile(model, x[:rows], y[:rows], loss, repeat=1) for rows in set(sizes)}
    balance = [len(model) // stages + (1 if i < len(model) % stages else 0) for i in range(stages)]
    guess = predict(plan_schedule, balance, 2, sizes, profiles, checkpoint)
    with Pipeline(model, schedule=schedule, balance=balance, devices=["cpu"] * 2, chunks=chunks,
                  checkpoint=checkpoint, loss_fn=loss) as pipe:
        pipe.step(x, y)
        assert guess.activation_bytes == pipe.last_report.peak_activation_bytes
        assert guess.peak_bytes == measured_peak_bytes(pipe)


@pytest.mark.parametrize("schedule, checkpoint", [("zb-h1", "never"), ("zb-v", "always"), ("interleaved-zb", "never")])
def test_predicted_peak_bytes_bound_the_measured_for_split_backwards(schedule, checkpoint):
    """A split backward's B frees part of what W does not need: the prediction is an upper bound, within 1.6x."""
    model, x, y, loss = mlp(), torch.randn(32, 16), torch.randint(0, 8, (32,)), nn.CrossEntropyLoss()
    plan_schedule = get_schedule(schedule)
    stages = plan_schedule.default_num_stages(2)
    profiles = {8: pipesched.profile(model, x[:8], y[:8], loss, repeat=1)}
    balance = [len(model) // stages + (1 if i < len(model) % stages else 0) for i in range(stages)]
    guess = predict(plan_schedule, balance, 2, [8] * 4, profiles, checkpoint)
    with Pipeline(model, schedule=schedule, balance=balance, devices=["cpu"] * 2, chunks=4,
                  checkpoint=checkpoint, loss_fn=loss) as pipe:
        pipe.step(x, y)
        measured = pipe.last_report.peak_activation_bytes
    for predicted, real in zip(guess.activation_bytes, measured):
        assert real <= predicted <= 1.6 * real


# ------------------------------------------------------------------ tune


def test_tune_respects_a_memory_budget_that_gpipe_at_many_micro_batches_exceeds():
    """GPipe keeps every micro-batch's activations: a budget below its peak must pick something that fits,
    and a real run of the pick stays under the budget (activations + parameters + gradients, measured)."""
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y, loss = torch.randn(64, 32), torch.randint(0, 10, (64,)), nn.CrossEntropyLoss()
    free = pipesched.tune(model, x, y, loss, devices=["cpu"] * 2, schedules=["gpipe", "1f1b"], chunks=[16],
                          checkpoint=["never"], repeat=1)
    gpipe = next(c for c in free.candidates if c.schedule == "gpipe")
    one_f_one_b = next(c for c in free.candidates if c.schedule == "1f1b")
    budget = (max(gpipe.predicted_peak_bytes) + max(one_f_one_b.predicted_peak_bytes)) // 2
    assert max(one_f_one_b.predicted_peak_bytes) < budget < max(gpipe.predicted_peak_bytes)

    result = pipesched.tune(model, x, y, loss, devices=["cpu"] * 2, schedules=["gpipe", "1f1b"], chunks=[16],
                            checkpoint=["never"], memory_budget=budget, profile=list(free.profiles.values()),
                            measure=1)
    best = result.best
    assert best.fits and best.schedule == "1f1b" and max(best.predicted_peak_bytes) <= budget
    assert not next(c for c in result.candidates if c.schedule == "gpipe").fits
    assert best.measured_step_s is not None and max(best.measured_peak_bytes) <= budget
    with Pipeline(model, **best.pipeline_kwargs(), loss_fn=loss) as pipe:  # and once more, by hand
        pipe.step(x, y)
        assert max(measured_peak_bytes(pipe)) <= budget
    with pytest.raises(ValueError, match="no candidate fits memory_budget"):
        pipesched.tune(model, x, y, loss, devices=2, schedules=["gpipe"], chunks=[16], checkpoint=["never"],
                       memory_budget=budget, profile=list(free.profiles.values()))


def test_tune_ranks_a_balanced_split_of_a_heavy_head_first_and_pipeline_kwargs_run():
    model = sleep_model([0.0] * 6 + [4.0])
    x, y = torch.zeros(8, 1), torch.zeros(8, 1)
    result = pipesched.tune(model, x, y, nn.MSELoss(), devices=["cpu"] * 2, schedules=["gpipe", "1f1b"],
                            chunks=[2, 4], checkpoint=["never"], repeat=3, measure=0, unpipelined=False)
    times = [c.predicted_step_s for c in result.candidates]
    assert all(later >= earlier / (1 + TIE) for earlier, later in zip(times, times[1:]))  # ties: simpler first
    # 6 light layers that do not sleep, and a head of 3 x 4 ms per row
    assert [c.balance for c in result.candidates] == [[6, 1]] * len(result.candidates)
    kwargs = result.best_pipelined.pipeline_kwargs()
    assert set(kwargs) == {"schedule", "balance", "devices", "chunks", "checkpoint"}
    assert result.best.pipeline_line().startswith(f"Pipeline(model, schedule={result.best.schedule!r}")
    assert "best: Pipeline(model" in result.format_table()
    import json
    document = json.loads(result.to_json())
    assert document["best"]["schedule"] == result.best.schedule and document["profiles"]


def test_tune_is_callable_through_every_import_path():
    import pipesched.tune as package
    from pipesched.tune.search import tune as function

    assert callable(package) and callable(pipesched.tune)
    assert package.tune is function


def test_tune_refuses_bad_arguments():
    model, x, y = mlp(), torch.randn(4, 16), torch.randint(0, 8, (4,))
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="memory_budget must be a number of bytes > 0"):
        pipesched.tune(model, x, y, loss, devices=2, memory_budget=-1)
    with pytest.raises(ValueError, match="more than the batch's 4 rows"):
        pipesched.tune(model, x, y, loss, devices=2, chunks=[8])
    with pytest.raises(ValueError, match="checkpoint holds 'sometimes'"):
        pipesched.tune(model, x, y, loss, devices=2, checkpoint=["sometimes"])
    with pytest.raises(ValueError, match="unknown schedule"):
        pipesched.tune(model, x, y, loss, devices=2, schedules=["nope"])
    with pytest.raises(ValueError, match="devices must be a non-empty list"):
        pipesched.tune(model, x, y, loss, devices="cpu")


@pytest.mark.parametrize("text, value", [("1000", 1000), ("512KiB", 512 * 1024), ("2GiB", 2 * 2**30),
                                         ("1.5MB", 1_500_000), ("3 mib", 3 * 2**20)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_refuses_nonsense():
    with pytest.raises(ValueError, match="512KiB"):
        parse_bytes("lots")


def test_pipesched_tune_shows_its_arguments_to_inspect():
    """``pipesched.tune`` is the package and a callable; ``help``/IDEs read the function's signature."""
    import inspect

    import pipesched

    params = inspect.signature(pipesched.tune).parameters
    assert {"module", "inputs", "targets", "loss_fn", "devices", "memory_budget", "measure"} <= set(params)
