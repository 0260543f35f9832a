"""Random streams per (stage, micro-batch): reproducible, schedule-independent, exactly replayed.

The oracle is written with plain torch: the un-pipelined layers run one
micro-batch at a time, each stage's forward seeded with
``forward_seed(step_seed, stage, microbatch)`` — the rule docs/guide/checkpointing.md states.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal
from pipesched import Pipeline
from pipesched.runtime.microbatch import split_sizes
from pipesched.runtime.rng import draw_step_seed, draws_nothing, forward_seed, holding_generators

POLICIES = ["never", "always", "except_last", lambda stage, mb: (stage + mb) % 2 == 0]


def dropout_everywhere(stages: int = 4, width: int = 10, seed: int = 0) -> nn.Sequential:
    """``stages`` blocks of Linear → Tanh → Dropout: every stage draws."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(stages):
        layers += [nn.Linear(width, width), nn.Tanh(), nn.Dropout(0.3)]
    return nn.Sequential(*layers).double()


def batch(rows: int = 16, width: int = 10):
    generator = torch.Generator().manual_seed(7)
    return torch.randn(rows, width, dtype=torch.float64, generator=generator), torch.randn(
        rows, width, dtype=torch.float64, generator=generator
    )


def oracle_grads(model: nn.Sequential, balance: list[int], chunks: int, x, y, caller_seed: int):
    """Plain torch: each (stage, micro-batch) forward seeded by the documented rule."""
    ref = copy.deepcopy(model)
    torch.manual_seed(caller_seed)
    step_seed = draw_step_seed()
    layers = list(ref)
    bounds = [sum(balance[:i]) for i in range(len(balance) + 1)]
    sizes = split_sizes(x.shape[0], chunks)
    total = 0.0
    for m, (xm, ym) in enumerate(zip(torch.split(x, sizes), torch.split(y, sizes))):
        h = xm
        for s in range(len(balance)):
            torch.manual_seed(forward_seed(step_seed, s, m))
            for layer in layers[bounds[s]:bounds[s + 1]]:
                h = layer(h)
        loss = nn.functional.mse_loss(h, ym) * (xm.shape[0] / x.shape[0])
        loss.backward()
        total += float(loss.detach())
    return total, [p.grad.clone() for p in ref.parameters()]


def run(model, schedule, balance, devices, chunks, policy, x, y, caller_seed):
    torch.manual_seed(caller_seed)
    with Pipeline(model, schedule=schedule, balance=balance, devices=devices, chunks=chunks,
                  checkpoint=policy, loss_fn=nn.MSELoss()) as pipe:
        loss = pipe.step(x, y)
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("policy", POLICIES, ids=["never", "always", "except_last", "callable"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dropout_masks_follow_the_documented_per_microbatch_streams(schedule, policy):
    x, y = batch()
    model = dropout_everywhere()
    expected_loss, expected = oracle_grads(model, [3, 3, 3, 3], 4, x, y, caller_seed=11)
    loss, _ = run(model, schedule, [3, 3, 3, 3], ["cpu"] * 4, 4, policy, x, y, caller_seed=11)
    assert_grads_equal(model, expected)
    assert abs(float(loss) - expected_loss) < 1e-12


def test_reruns_with_dropout_on_every_rank_are_bit_identical():
    """Regression: with several ranks drawing, two seeded runs used to differ by thread timing."""
    x, y = batch(rows=32)
    results = []
    for _ in range(3):
        model = dropout_everywhere()
        results.append(run(model, "1f1b", [3, 3, 3, 3], ["cpu"] * 4, 8, "except_last", x, y, caller_seed=3))
    (loss0, grads0), *others = results
    for loss, grads in others:
        assert torch.equal(loss, loss0)
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0))


def test_checkpoint_policies_give_bit_identical_results_with_dropout_on_every_stage():
    x, y = batch()
    results = [run(dropout_everywhere(), "1f1b", [3, 3, 3, 3], ["cpu"] * 4, 4, policy, x, y, caller_seed=5)
               for policy in POLICIES]
    (loss0, grads0), *others = results
    for loss, grads in others:
        assert torch.equal(loss, loss0)
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0))


def test_schedules_draw_the_same_masks_for_the_same_balance():
    """gpipe, 1f1b and interleaved differ only in the order micro-batch gradients are summed."""
    x, y = batch()
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):  # eight stages, each Linear → Dropout: every stage draws
        layers += [nn.Linear(10, 10), nn.Dropout(0.3)]
    model = nn.Sequential(*layers).double()
    balance = [2] * 8
    outcomes = {
        "gpipe": run(copy.deepcopy(model), "gpipe", balance, ["cpu"] * 8, 4, "always", x, y, caller_seed=8),
        "1f1b": run(copy.deepcopy(model), "1f1b", balance, ["cpu"] * 8, 4, "never", x, y, caller_seed=8),
        "interleaved": run(copy.deepcopy(model), "interleaved", balance, ["cpu"] * 4, 4, "except_last",
                           x, y, caller_seed=8),
    }
    _, expected = oracle_grads(model, balance, 4, x, y, caller_seed=8)
    for name, (loss, grads) in outcomes.items():
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12, msg=name)
    loss0 = outcomes["gpipe"][0]
    for name, (loss, _) in outcomes.items():
        torch.testing.assert_close(loss, loss0, rtol=0, atol=1e-12, msg=name)


class DropoutWhenLarge(nn.Module):
    """Draws only for inputs whose mean is positive: silent in some forwards, drawing in others."""

    def forward(self, x):
        if float(x.detach().mean()) > 0:
            return nn.functional.dropout(x, 0.5, self.training)
        return x


class SwitchedOnDropout(nn.Module):
    """Draws only once ``active`` is set: a module that starts drawing after the first steps."""

    active = False

    def forward(self, x):
        return nn.functional.dropout(x, 0.5, True) if self.active else x * 1.0


@pytest.mark.parametrize("policy", POLICIES, ids=["never", "always", "except_last", "callable"])
def test_stage_that_starts_drawing_after_its_first_forward_replays_exactly(policy):
    """Regression: a stage probed silent and drawing later was recomputed without replay."""
    torch.manual_seed(0)
    width = 10
    switch = SwitchedOnDropout()
    model = nn.Sequential(nn.Linear(width, width), switch, nn.Linear(width, width), DropoutWhenLarge(),
                          nn.Linear(width, width)).double()
    x, y = batch(rows=24)
    x[:6] = x[:6].abs() + 0.5  # micro-batch 0 draws in stage 1 (DropoutWhenLarge), the rest not
    x[6:] = -x[6:].abs() - 0.5
    balance = [2, 2, 1]
    with Pipeline(model, schedule="1f1b", balance=balance, devices=["cpu"] * 3, chunks=4,
                  checkpoint=policy, loss_fn=nn.MSELoss()) as pipe:
        torch.manual_seed(1)
        pipe.step(x, y)  # stage 0 silent in this step
        switch.active = True
        model.zero_grad()
        torch.manual_seed(2)
        pipe.step(x, y)
    _, expected = oracle_grads(model, balance, 4, x, y, caller_seed=2)
    assert_grads_equal(model, expected)


def test_caller_generator_advances_by_one_draw_only_when_a_stage_may_draw():
    x, y = batch()
    for model, draws in [(dropout_everywhere(), True),
                         (nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 10)).double(), False)]:
        torch.manual_seed(21)
        with Pipeline(model, schedule="1f1b", chunks=4, devices=["cpu"] * 2, loss_fn=nn.MSELoss()) as pipe:
            pipe.step(x, y)
        after = torch.rand(())
        torch.manual_seed(21)
        if draws:
            draw_step_seed()
        assert torch.equal(after, torch.rand(())), f"draws={draws}"


class Quiet(nn.Module):
    """A custom layer that draws nothing: runs watched, never takes the lock."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(10, 10)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class GatedQuiet(Quiet):
    """Quiet; its first forward waits for ``held``: by then the step's seed is drawn (that one draw
    holds the lock, so that it never takes numbers from a seeded forward of another pipeline)."""

    def __init__(self, started: threading.Event, held: threading.Event):
        super().__init__()
        self.started, self.held = started, held

    def forward(self, x):
        if not self.started.is_set():
            self.started.set()
            self.held.wait(timeout=30)
        return super().forward(x)


@pytest.mark.parametrize("model_factory", [
    lambda started, held: nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10)),
    lambda started, held: nn.Sequential(GatedQuiet(started, held), Quiet(), Quiet()),
    lambda started, held: nn.Sequential(*[nn.TransformerEncoderLayer(10, 2, 16, dropout=0.0) for _ in range(3)]),
], ids=["torch-layers", "custom-layers", "transformer-dropout-0"])
def test_stages_that_draw_nothing_never_wait_for_the_generator_lock(model_factory):
    """While another thread holds the CPU generator's lock, a non-drawing pipeline's forwards still run."""
    started, held = threading.Event(), threading.Event()
    model = model_factory(started, held).double()
    if not isinstance(model[0], GatedQuiet):
        started.set()  # no step seed to draw: hold the lock from the start
    x, y = batch()
    done = threading.Event()

    def step() -> None:
        with Pipeline(model, schedule="1f1b", balance=[1, 1, 1], devices=["cpu"] * 3, chunks=4,
                      checkpoint="except_last", loss_fn=nn.MSELoss(), stall_timeout=30) as pipe:
            pipe.step(x, y)
        done.set()

    thread = threading.Thread(target=step, daemon=True)
    thread.start()
    assert started.wait(timeout=30)
    with holding_generators(torch.device("cpu")):
        held.set()
        finished = done.wait(timeout=30)
    thread.join(timeout=30)
    assert finished, "a stage that draws nothing waited for the generator lock"


class AlwaysDrop(nn.Module):
    def forward(self, x):
        return nn.functional.dropout(x, 0.5, True)


def test_watcher_watches_only_the_thread_that_runs_its_stage():
    """A drawing stage on one rank does not mark the silent stages running beside it."""
    model = nn.Sequential(Quiet(), AlwaysDrop(), Quiet()).double()
    x, y = batch(rows=32)
    with Pipeline(model, schedule="1f1b", balance=[1, 1, 1], devices=["cpu"] * 3, chunks=8,
                  loss_fn=nn.MSELoss()) as pipe:
        for _ in range(3):
            pipe.step(x, y)
        assert pipe._random.known_to_draw(1, True)
        assert not pipe._random.known_to_draw(0, True)
        assert not pipe._random.known_to_draw(2, True)
    assert torch._C._len_torch_dispatch_stack() == 0


class NoisyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) + torch.rand_like(x)


def test_only_exact_quiet_classes_in_a_quiet_state_are_trusted():
    def quiet(*layers):
        return draws_nothing(nn.Sequential(*layers))

    assert quiet(nn.Linear(2, 2), nn.Dropout(0.0), nn.Dropout(0.5).eval(), nn.RReLU().eval(),
                 nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0))
    assert not quiet(nn.Dropout(0.5))
    assert not quiet(nn.RReLU())
    assert not quiet(NoisyLinear(2, 2))  # a subclass of a quiet class is watched
    assert not quiet(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1))
    assert not quiet(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, activation=lambda x: x * torch.rand_like(x)))
    hooked = nn.Linear(2, 2)
    hooked.register_forward_hook(lambda *args: None)
    assert not quiet(hooked)


class SwitchedOff(nn.Module):
    """Calls random functions with the argument that switches their draw off."""

    def forward(self, x):
        x = nn.functional.dropout(x, 0.0, True) + nn.functional.dropout(x, 0.5, False)
        x = nn.functional.rrelu(x, training=False)
        q = x.view(x.shape[0], 1, 2, 5)
        return x + nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.0).reshape(x.shape)


def test_calls_that_switch_their_draw_off_do_not_mark_a_stage_drawing():
    """dropout(p=0) / training=False, rrelu in eval, SDPA with dropout_p=0: no lock, no seed."""
    model = nn.Sequential(SwitchedOff(), nn.Dropout(0.5).eval(), SwitchedOff()).double()
    x, y = batch()
    with Pipeline(model, schedule="1f1b", balance=[2, 1], devices=["cpu"] * 2, chunks=4,
                  checkpoint="except_last", loss_fn=nn.MSELoss()) as pipe:
        pipe.step(x, y)
        assert not pipe._random.known_to_draw(0, True)
        assert not pipe._random.known_to_draw(1, True)


_WATCHED_STEP = r"""
import sys, torch
from torch import nn
from pipesched import Pipeline

class Custom(nn.Module):  # not an exact quiet class: its forwards run under the draw watcher
    def forward(self, x):
        return torch.nn.functional.dropout(x, 0.2, self.training)

model = nn.Sequential(nn.Linear(8, 8), Custom(), nn.Tanh(), nn.Linear(8, 4)).double()
x, y = torch.randn(8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
with Pipeline(model, schedule="1f1b", balance=[2, 2], devices=["cpu", "cpu"], chunks=4, checkpoint="always",
              loss_fn=nn.CrossEntropyLoss()) as pipe:
    pipe.step(x, y)
print("dynamo imported:", "torch._dynamo" in sys.modules)
"""


def test_the_draw_watcher_does_not_import_dynamo_on_the_first_step():
    """torch wraps every dispatch mode's ``__torch_dispatch__`` in ``_disable_dynamo``, whose first call
    imports torch._dynamo: 2-3 s inside the first watched forward, which tripped a 2 s stall_timeout
    on a loaded machine. The watcher now keeps Dynamo out itself, only once Dynamo is loaded."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _WATCHED_STEP], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "dynamo imported: False" in done.stdout, done.stdout + done.stderr
