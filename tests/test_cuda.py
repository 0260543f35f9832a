"""The same guarantees on CUDA: own compute stream per rank, copy streams, events.

Skipped on machines without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
from pipesched import Pipeline

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def data(rows=16, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, 8, dtype=torch.float64, generator=g).to(device),
            torch.randint(0, 4, (rows,), generator=g).to(device))


@pytest.mark.parametrize("schedule,balance,devices", [
    ("gpipe", [3, 3], ["cuda:0", "cuda:0"]),
    ("1f1b", [2, 2, 2], ["cuda:0", "cpu", "cuda:0"]),
    ("interleaved", [2, 1, 1, 2], ["cuda:0", "cuda:0"]),
])
@pytest.mark.parametrize("policy", ["always", "never"])
def test_gradients_match_on_cuda(schedule, balance, devices, policy):
    model = mlp(layers=6)
    x, y = data()
    _, ref = reference_grads(model, nn.CrossEntropyLoss(), x, y)
    with Pipeline(model, schedule=schedule, balance=balance, devices=devices, chunks=4,
                  checkpoint=policy, loss_fn=nn.CrossEntropyLoss()) as pipe:
        streams = [w.stream for w in pipe._orchestrator.workers]
        assert all((s is not None) == (d.type == "cuda") for s, d in zip(streams, pipe.devices))
        pipe.step(x, y)
    torch.cuda.synchronize()
    assert_grads_equal(model, [g.to(p.device) for g, p in zip(ref, model.parameters())], atol=1e-10)


@pytest.mark.parametrize("targets_on", ["cpu", "cuda:0"])
def test_padded_class_weighted_loss_on_cuda(targets_on):
    """Token normalisers with the class weights on the GPU and targets on either device."""
    model = mlp(layers=6)
    x, y = data()
    y[[0, 1, 2, 4, 5, 6, 7, 9]] = -100  # micro-batch 1 all padding
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    _, ref = reference_grads(model, nn.CrossEntropyLoss(weight=weight), x, y)
    loss_fn = nn.CrossEntropyLoss(weight=weight).to("cuda:0")
    with Pipeline(model, schedule="1f1b", balance=[3, 3], devices=["cuda:0", "cuda:0"], chunks=4,
                  loss_fn=loss_fn) as pipe:
        pipe.step(x, y.to(targets_on))
    torch.cuda.synchronize()
    assert_grads_equal(model, [g.to(p.device) for g, p in zip(ref, model.parameters())], atol=1e-10)


def test_dropout_replay_on_cuda_is_policy_independent():
    x, y = data(device="cuda:0")
    grads = []
    for policy in ["never", "always"]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 4)).double()
        torch.manual_seed(7)
        with Pipeline(model, schedule="1f1b", balance=[2, 1], devices=["cuda:0", "cuda:0"],
                      chunks=4, checkpoint=policy, loss_fn=nn.CrossEntropyLoss()) as pipe:
            pipe.step(x, y)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_one_f_one_b_allocates_less_than_gpipe_on_the_device():
    peaks = {}
    for schedule in ["gpipe", "1f1b"]:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])
        x = torch.randn(2048, 1024, device="cuda:0")
        with Pipeline(model, schedule=schedule, devices=["cuda:0"] * 4, chunks=16,
                      checkpoint="never", loss_fn=nn.MSELoss()) as pipe:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            pipe.step(x, torch.zeros_like(x))
            torch.cuda.synchronize()
            peaks[schedule] = torch.cuda.max_memory_allocated() - base
    assert peaks["1f1b"] < peaks["gpipe"]


class SleepKernel(nn.Module):
    """Identity that first keeps its stream busy for ``cycles`` GPU cycles (host returns at once)."""

    def __init__(self, cycles: int):
        super().__init__()
        self.cycles = cycles

    def forward(self, x):
        torch.cuda._sleep(self.cycles)
        return x * 1.0


def kernel_seconds(cycles: int) -> float:
    """What ``torch.cuda._sleep(cycles)`` takes on the device, measured with events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_ranks_wait_for_inputs_the_caller_is_still_writing(schedule):
    """A long kernel on the caller's stream, then the input's last write, then step(): no race.

    Without the fence the ranks' streams read ``x`` before the caller's
    stream has filled it. No synchronize() in between, as users write it.
    """
    model = mlp(layers=6).to("cuda:0")
    reference = mlp(layers=6).to("cuda:0")
    y = torch.randint(0, 4, (16,), device="cuda:0")
    with Pipeline(model, schedule=schedule, balance=[3, 3], devices=["cuda:0", "cuda:0"], chunks=4,
                  checkpoint="never", loss_fn=nn.CrossEntropyLoss()) as pipe:
        x = torch.zeros(16, 8, dtype=torch.float64, device="cuda:0")
        torch.cuda._sleep(200_000_000)  # ~0.1 s of the caller's stream
        x.fill_(0.5)
        loss = pipe.step(x, y)
        expected = nn.CrossEntropyLoss()(reference(torch.full_like(x, 0.5)), y)
        assert abs(loss.item() - expected.item()) < 1e-10


def test_training_with_an_optimizer_between_steps_matches_unpipelined_on_the_gpu():
    """Several optimizer steps, all on the caller's stream, interleaved with pipeline steps."""
    model = mlp(layers=6, dropout=0.0).to("cuda:0")
    plain = mlp(layers=6, dropout=0.0).to("cuda:0")
    g = torch.Generator(device="cuda:0").manual_seed(0)
    batches = [(torch.randn(16, 8, dtype=torch.float64, device="cuda:0", generator=g),
                torch.randint(0, 4, (16,), device="cuda:0", generator=g)) for _ in range(4)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    with Pipeline(model, schedule="1f1b", balance=[2, 2, 2], devices=["cuda:0"] * 3, chunks=4,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            pipe.step(x, y)
            optimizer.step()
            plain_optimizer.zero_grad(set_to_none=True)
            nn.CrossEntropyLoss()(plain(x), y).backward()
            plain_optimizer.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


def test_forward_output_is_safe_on_the_callers_stream():
    model = nn.Sequential(SleepKernel(50_000_000), nn.Linear(8, 8), SleepKernel(50_000_000),
                          nn.Linear(8, 4)).double().to("cuda:0")
    x = torch.randn(16, 8, dtype=torch.float64, device="cuda:0")
    with Pipeline(model, schedule="gpipe", balance=[2, 2], devices=["cuda:0", "cuda:0"], chunks=4) as pipe:
        with torch.no_grad():
            out = pipe(x)
            expected = model(x)
        assert torch.equal(out, expected)


def test_task_records_are_device_times_not_enqueue_times():
    cycles = 100_000_000
    seconds = kernel_seconds(cycles)
    model = nn.Sequential(SleepKernel(cycles), nn.Linear(8, 4)).double().to("cuda:0")
    x = torch.randn(8, 8, dtype=torch.float64, device="cuda:0")
    with Pipeline(model, schedule="gpipe", balance=[1, 1], devices=["cuda:0", "cuda:0"], chunks=2,
                  loss_fn=nn.MSELoss()) as pipe:
        pipe.step(x, torch.zeros(8, 4, dtype=torch.float64, device="cuda:0"))
        forwards = [r for r in pipe.last_report.tasks if r.kind == "F" and r.stage == 0]
    assert forwards and all(r.duration > 0.5 * seconds for r in forwards), (seconds, forwards)


def test_reruns_with_dropout_are_bit_identical_on_the_gpu():
    x, y = data(device="cuda:0")
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 32), nn.Dropout(0.5),
                              nn.Linear(32, 4)).double().to("cuda:0")
        torch.manual_seed(3)
        with Pipeline(model, schedule="1f1b", balance=[2, 2, 1], devices=["cuda:0"] * 3, chunks=4,
                      checkpoint="except_last", loss_fn=nn.CrossEntropyLoss()) as pipe:
            losses.append(pipe.step(x, y).item())
    assert losses[0] == losses[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_gradients_match_across_two_devices(schedule):
    model = mlp(layers=6)
    x, y = data(device="cuda:0")
    _, ref = reference_grads(model, nn.CrossEntropyLoss(), x.cpu(), y.cpu())
    with Pipeline(model, schedule=schedule, balance=[3, 3], devices=["cuda:0", "cuda:1"], chunks=4,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, y)
        grads = [p.grad.cpu() for p in model.parameters()]
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_tied_weight_on_ranks_sharing_one_device_is_exact():
    from test_shared_layers import NEXT, TOKENS, tied_language_model, token_loss

    model = tied_language_model()
    _, ref = reference_grads(model, token_loss, TOKENS, NEXT)
    with Pipeline(model, schedule="1f1b", balance=[3, 3], devices=["cuda:0", "cuda:0"], chunks=4,
                  checkpoint="except_last", loss_fn=token_loss) as pipe:
        pipe.step(TOKENS.cuda(), NEXT.cuda())
    torch.cuda.synchronize()
    assert_grads_equal(model, [g.cuda() for g in ref], atol=1e-10)


def test_tied_weight_on_two_devices_is_refused_before_anything_moves():
    from test_shared_layers import tied_language_model

    model = tied_language_model()
    with pytest.raises(ValueError, match=r"'0.weight' = '5.weight' is shared by stage 0 \(rank 0, cpu\), "
                                         r"stage 1 \(rank 1, cuda:0\)"):
        Pipeline(model, balance=[3, 3], devices=["cpu", "cuda:0"])
    assert all(p.device.type == "cpu" for p in model.parameters())
