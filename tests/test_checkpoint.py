"""Checkpointing: recompute replays random draws exactly, and memory is measured, not claimed."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, mlp
from pipesched import Pipeline, is_checkpointing, is_recomputing
from pipesched.runtime.checkpoint import _checkpointing_scope, _recomputing_scope


def dropout_model(seed: int = 0) -> nn.Sequential:
    """Six layers; only layer 1 (stage 0 under balance [3, 3]) draws random numbers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    ).double()


def data(rows: int = 12):
    generator = torch.Generator().manual_seed(5)
    return (torch.randn(rows, 8, dtype=torch.float64, generator=generator),
            torch.randint(0, 4, (rows,), generator=generator))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_one_drawing_rank_gives_identical_results_under_every_policy(schedule):
    """Recompute replays the first run's masks and leaves the global stream where it was."""
    x, y = data()
    results = {}
    for policy in ["never", "always", "except_last", lambda s, m: m % 2 == 1]:
        model = dropout_model()
        torch.manual_seed(1234)
        with Pipeline(model, schedule=schedule, balance=[3, 3], chunks=4, checkpoint=policy,
                      loss_fn=nn.CrossEntropyLoss()) as pipe:
            loss = pipe.step(x, y)
        after = torch.get_rng_state()
        results[str(policy)] = (loss, [p.grad for p in model.parameters()], after)
    (loss0, grads0, state0), *others = results.values()
    for loss, grads, state in others:
        assert torch.equal(loss, loss0)
        for g, g0 in zip(grads, grads0):
            assert torch.equal(g, g0)
        assert torch.equal(state, state0), "the global random stream was disturbed"


class RecordingNoise(nn.Module):
    """Multiplies by a random mask and records the mask of every first run and recompute."""

    def __init__(self, log: dict, name: str):
        super().__init__()
        self.log, self.name = log, name

    def forward(self, x):
        noise = torch.rand_like(x)
        key = (self.name, round(float(x.detach()[0, 0]), 9))
        phase = "recompute" if torch.is_grad_enabled() else "first"
        with self.log["lock"]:
            self.log.setdefault(key, {})[phase] = noise.clone()
        return x * noise


@pytest.mark.parametrize("schedule,balance", [("1f1b", [2, 2, 2, 2]),
                                              ("interleaved", [1, 1, 1, 1, 1, 1, 1, 1])])
def test_replay_exact_while_every_rank_draws_concurrently(schedule, balance):
    """Four ranks draw from the one CPU generator at once; every recompute sees its own draws."""
    log: dict = {"lock": threading.Lock()}
    layers = []
    for i in range(8):
        layers.append(nn.Linear(16, 16) if i % 2 == 0 else RecordingNoise(log, f"noise{i}"))
    model = nn.Sequential(*layers).double()
    x = torch.randn(64, 16, dtype=torch.float64)
    with Pipeline(model, schedule=schedule, balance=balance, devices=["cpu"] * 4, chunks=16,
                  checkpoint="always", loss_fn=lambda out, t: out.pow(2).mean()) as pipe:
        pipe.step(x, torch.zeros(64))
    pairs = [v for k, v in log.items() if k != "lock"]
    assert len(pairs) == 4 * 16  # four noise layers, sixteen micro-batches
    for phases in pairs:
        assert set(phases) == {"first", "recompute"}
        assert torch.equal(phases["first"], phases["recompute"])


class TestMeasuredMemory:
    """Activation bytes from first principles: Linear(16, 16) saves its 4-row float32 input."""

    ROWS, WIDTH = 4, 16
    PER_MICROBATCH = ROWS * WIDTH * 4  # bytes of one micro-batch's stage-0 input

    def run(self, schedule: str, policy: str, chunks: int = 3, stages: int = 2):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(self.WIDTH, self.WIDTH) for _ in range(stages)])
        x = torch.randn(self.ROWS * chunks, self.WIDTH)
        with Pipeline(model, schedule=schedule, chunks=chunks, checkpoint=policy,
                      devices=["cpu"] * stages, loss_fn=nn.MSELoss()) as pipe:
            pipe.step(x, torch.zeros_like(x))
            return pipe.last_report

    @pytest.mark.parametrize("policy", ["never", "always"])
    def test_gpipe_rank0_holds_every_microbatch_input(self, policy):
        report = self.run("gpipe", policy)
        assert report.peak_activation_bytes[0] == 3 * self.PER_MICROBATCH
        assert report.peak_inflight == [3, 3]

    def test_one_f_one_b_rank0_holds_ranks_many(self):
        report = self.run("1f1b", "never", chunks=6)
        assert report.peak_inflight == [2, 1]
        assert report.peak_activation_bytes[0] == 2 * self.PER_MICROBATCH

    def test_one_f_one_b_holds_less_than_gpipe(self):
        gpipe = self.run("gpipe", "never", chunks=8, stages=4)
        one_f = self.run("1f1b", "never", chunks=8, stages=4)
        assert one_f.peak_activation_bytes[0] < gpipe.peak_activation_bytes[0]
        assert one_f.peak_inflight == [4, 3, 2, 1] and gpipe.peak_inflight == [8] * 4

    def test_gpipe_memory_grows_linearly_with_microbatches(self):
        small = self.run("gpipe", "never", chunks=4, stages=4).peak_activation_bytes
        large = self.run("gpipe", "never", chunks=8, stages=4).peak_activation_bytes
        assert large == [2 * b for b in small]

    def test_checkpointing_keeps_only_stage_inputs(self):
        """Tanh saves its output: without checkpointing that is held too."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        x = torch.randn(12, 16)
        peaks = {}
        for policy in ["never", "always"]:
            with Pipeline(model, schedule="gpipe", balance=[2, 1], chunks=3, checkpoint=policy,
                          loss_fn=nn.MSELoss()) as pipe:
                pipe.step(x, torch.zeros_like(x))
                peaks[policy] = pipe.last_report.peak_activation_bytes[0]
        # never: input + tanh output per micro-batch; always: inputs, plus one recompute's tanh output
        assert peaks["never"] == 3 * 2 * self.PER_MICROBATCH
        assert peaks["always"] == 3 * self.PER_MICROBATCH + self.PER_MICROBATCH


def test_nothing_is_held_after_a_step():
    """Every held (stage, micro-batch) is released by its backward: the running total is 0."""
    model = mlp(layers=6)
    x = torch.randn(12, 8, dtype=torch.float64)
    with Pipeline(model, schedule="1f1b", balance=[3, 3], chunks=4, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x, torch.zeros(12, dtype=torch.long))
        assert all(b > 0 for b in pipe.last_report.peak_activation_bytes)
        assert pipe.last_report.held_activation_bytes == [0, 0]
    with Pipeline(model, schedule="gpipe", balance=[3, 3], chunks=4) as pipe:
        out = pipe(x)  # forward half: everything stays held for the backward
        assert all(b > 0 for b in pipe.last_report.held_activation_bytes)
        out.sum().backward()
        assert pipe.last_report.held_activation_bytes == [0, 0]


class TestPhaseFlags:
    """``is_checkpointing()`` (first, graph-less run of a checkpointed forward), ``is_recomputing()``."""

    @staticmethod
    def phases(policy, chunks: int = 3) -> list[tuple[bool, bool, bool]]:
        seen: list[tuple[bool, bool, bool]] = []

        class Probe(nn.Module):
            def forward(self, x):
                seen.append((is_checkpointing(), is_recomputing(), torch.is_grad_enabled()))
                return x

        model = nn.Sequential(nn.Linear(8, 8), Probe(), nn.Linear(8, 4)).double()
        x, y = data(6)
        with Pipeline(model, schedule="1f1b", balance=[2, 1], chunks=chunks, checkpoint=policy,
                      loss_fn=nn.CrossEntropyLoss()) as pipe:
            pipe.step(x, y)
        assert not is_checkpointing() and not is_recomputing()  # the caller's thread: neither
        return sorted(seen)

    FIRST_RUN, RECOMPUTE, PLAIN = (True, False, False), (False, True, True), (False, False, True)

    @pytest.mark.parametrize("policy,expected", [
        ("always", [RECOMPUTE] * 3 + [FIRST_RUN] * 3),
        ("except_last", [PLAIN] + [RECOMPUTE] * 2 + [FIRST_RUN] * 2),
        ("never", [PLAIN] * 3),
        (lambda stage, mb: mb == 1, [PLAIN] * 2 + [RECOMPUTE, FIRST_RUN]),
    ], ids=["always", "except_last", "never", "callable"])
    def test_a_module_sees_which_run_of_its_forward_it_is(self, policy, expected):
        assert self.phases(policy) == sorted(expected)

    def test_forward_only_call_is_neither(self):
        seen = []

        class Probe(nn.Module):
            def forward(self, x):
                seen.append((is_checkpointing(), is_recomputing()))
                return x

        with Pipeline(nn.Sequential(nn.Linear(4, 4), Probe()), balance=[1, 1], chunks=2,
                      checkpoint="always") as pipe, torch.no_grad():
            pipe(torch.randn(4, 4))
        assert seen == [(False, False)] * 2

    @pytest.mark.parametrize("scope,flag", [(_recomputing_scope, is_recomputing),
                                            (_checkpointing_scope, is_checkpointing)])
    def test_nested_scope_restores_the_outer_value_on_exit(self, scope, flag):
        """The recompute scope reset the flag to False on exit, even inside an outer scope."""
        with scope():
            with scope():
                assert flag()
            assert flag()
        assert not flag()
