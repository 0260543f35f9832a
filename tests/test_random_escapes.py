"""Draws a name list or a trusted ``forward`` missed: replayed exactly now, or refused loudly.

The oracle: the same seed under ``checkpoint="never"`` and ``"always"``. A
recompute that draws other masks than its first run gives gradients of
another forward than the loss, so the two policies' gradients differ; with
every draw on its (stage, micro-batch) stream they agree to round-off.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import Tensor, nn

import pipesched
from pipesched import Pipeline

SCHEDULES = ["1f1b", "zb-h1"]
CPU = ["cpu", "cpu"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def grads_under(model: nn.Module, schedule: str, policy: str, x: Tensor, y: Tensor, steps: int = 1,
                devices: list[str] = CPU, compile: bool = False):
    torch.manual_seed(123)
    with Pipeline(model, schedule=schedule, balance=[len(model) // 2, len(model) - len(model) // 2],
                  devices=devices, chunks=4, checkpoint=policy, loss_fn=nn.MSELoss()) as pipe:
        if compile:
            pipe.compile(backend="eager")
        for _ in range(steps):
            pipe.step(x, y)
    return [p.grad for p in model.parameters()]


def assert_replayed(model: nn.Module, schedule: str, x: Tensor, y: Tensor, devices: list[str] = CPU,
                    compile: bool = False) -> None:
    """Same seed: the gradients under "never" and "always" agree to round-off."""
    never = grads_under(copy.deepcopy(model), schedule, "never", x, y, devices=devices, compile=compile)
    always = grads_under(copy.deepcopy(model), schedule, "always", x, y, devices=devices, compile=compile)
    for index, (a, b) in enumerate(zip(never, always)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=f"parameter {index}")


def data(*shape: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(*shape, dtype=torch.float64, generator=g), torch.randn(*shape, dtype=torch.float64, generator=g)


def test_every_op_taking_a_generator_carries_the_tag_the_watcher_asks_for():
    """The watcher's premise: an op that can draw says so with torch.Tag.nondeterministic_seeded."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_seeds)

    untagged = []
    for namespace in (torch.ops.aten, torch.ops.prims):
        for name in dir(namespace):
            packet = getattr(namespace, name, None)
            for overload in getattr(packet, "overloads", lambda: [])():
                op = getattr(packet, overload)
                takes_generator = any("Generator" in str(a.type) for a in op._schema.arguments)
                if takes_generator and torch.Tag.nondeterministic_seeded not in op.tags:
                    untagged.append(str(op))
    assert not untagged
    assert torch.Tag.nondeterministic_seeded in torch.ops.prims.inductor_seeds.default.tags


class Recurrent(nn.Module):
    """``nn.LSTM``/``nn.GRU`` with dropout between its two layers, drawn inside the C++ op."""

    def __init__(self, cls: type[nn.RNNBase]):
        super().__init__()
        self.rnn = cls(6, 6, num_layers=2, dropout=0.5, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_lstm_dropout_between_layers_replays_under_recompute(cls, schedule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), Recurrent(cls), Recurrent(cls), nn.Linear(6, 6)).double()
    assert_replayed(model, schedule, *data(8, 5, 6))


class AtenDropout(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.aten.native_dropout.default(x, 0.5, True)[0]


class AtenBernoulli(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.ops.aten.bernoulli.p(x.detach(), 0.5)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("layer", [AtenDropout, AtenBernoulli], ids=["native_dropout.default", "bernoulli.p"])
def test_aten_overload_draws_replay(layer, schedule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), layer(), nn.Linear(6, 6), layer()).double()
    assert_replayed(model, schedule, *data(8, 6))


def test_compiled_stages_watched_for_draws_replay():
    """Dynamo compiles a watched stage (the watcher lets it) and the compiled kernels are seen."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), AtenBernoulli(), nn.Linear(6, 6), AtenDropout()).double()
    counters.clear()
    try:
        assert_replayed(model, "1f1b", *data(8, 6), compile=True)
        assert counters["stats"]["unique_graphs"] >= 2, "the watched stages ran uncompiled"
    finally:
        torch._dynamo.reset()  # Dynamo's per-process state (dynamic-shape profiles) would leak into later tests


def test_a_higher_order_op_under_the_watcher_counts_as_a_draw():
    """``torch.cond``'s branches run below the watcher, unseen: the watcher seeds before it (a
    dispatch mode without HOP support would make the call fail instead)."""
    from pipesched.runtime.draw_detection import Watcher
    from pipesched.runtime.generators import Held

    x = torch.randn(4)
    watcher = Watcher(Held(torch.device("cpu"), seed=1))
    try:
        with watcher:
            torch.cond(x.sum() > -1e9, lambda t: nn.functional.dropout(t, 0.5, True), lambda t: t * 1.0, (x,))
    finally:
        watcher.release()
        torch._dynamo.reset()  # torch.cond compiles its branches, in eager mode too
    assert watcher.fired


class NoisyConv(nn.Conv1d):
    """Keeps ``nn.Conv1d.forward``; draws weight noise in ``_conv_forward``."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(input, weight + 0.3 * torch.randn_like(weight), bias)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_quiet_class_subclass_drawing_elsewhere_replays(schedule):
    torch.manual_seed(0)
    model = nn.Sequential(NoisyConv(3, 3, 3, padding=1), nn.Tanh(), NoisyConv(3, 3, 3, padding=1)).double()
    assert_replayed(model, schedule, *data(8, 3, 7))


class ThreadDrawsDuringFirstRun(nn.Module):
    """During the first run of its checkpointed forward, another thread calls ``torch.rand`` in
    a loop until an Event is set; it has drawn at least once before this forward goes on. No
    thread draws during the recompute."""

    def __init__(self) -> None:
        super().__init__()
        self.draws = 0

    def forward(self, x: Tensor) -> Tensor:
        if pipesched.is_checkpointing() and not self.draws:
            stop, drawn = threading.Event(), threading.Event()

            def draw() -> None:
                while not stop.is_set():
                    torch.rand(64)
                    self.draws += 1
                    drawn.set()

            thread = threading.Thread(target=draw, daemon=True)
            thread.start()
            drawn.wait()
            stop.set()
            thread.join()
        return x


def test_other_thread_drawing_during_step_is_detected():
    """A thread drawing from torch's global generator during step() takes numbers from the
    forwards' streams (pipesched re-seeds that process-wide generator): the recompute would
    draw other masks than the first run. That must fail loudly, naming the stage and the cause."""
    torch.manual_seed(0)
    drawer = ThreadDrawsDuringFirstRun()
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 6), nn.Dropout(0.5), drawer).double()
    x, y = data(16, 6)
    with pytest.raises(RuntimeError, match=r"stage 1, micro-batch \d+: .*[Aa]nother thread drew from torch's "
                                           r"global generator during step\(\)"):
        grads_under(model, "1f1b", "always", x, y)
    assert drawer.draws > 0


class DrawsOnlyWhenRecomputed(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.dropout(x, 0.5, pipesched.is_recomputing())


def test_recompute_drawing_where_its_first_run_did_not_raises():
    """The recompute of a forward whose first run, watched, drew nothing is checked by the
    generators' state instead of watched again: a draw there still fails loudly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), DrawsOnlyWhenRecomputed()).double()
    x, y = data(8, 6)
    with pytest.raises(RuntimeError, match=r"stage 1, micro-batch \d: torch's CPU random generator moved.*"
                                           r"this recompute drew although the forward's first run drew nothing"):
        grads_under(model, "1f1b", "always", x, y)


@torch.library.custom_op("pipesched_test::untagged_noise", mutates_args=())
def untagged_noise(x: Tensor) -> Tensor:
    """A custom op registered without torch's nondeterministic_seeded tag that draws inside."""
    return x + torch.rand_like(x)


untagged_noise.register_fake(lambda x: torch.empty_like(x))
untagged_noise.register_autograd(lambda ctx, grad: grad)


class Untagged(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return untagged_noise(x)


@pytest.mark.parametrize("policy", ["never", "always"])
def test_escaped_draw_raises_naming_the_stage(policy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), Untagged()).double()
    x, y = data(8, 6)
    with pytest.raises(RuntimeError, match=r"stage 1, micro-batch \d: torch's CPU random generator moved .*"
                                           r"a random draw escaped .*nondeterministic_seeded"):
        grads_under(model, "1f1b", policy, x, y)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("layer", [lambda: Recurrent(nn.LSTM), AtenDropout, lambda: nn.Dropout(0.5)],
                         ids=["lstm", "native_dropout", "dropout"])
@pytest.mark.parametrize("devices", [["cuda:0", "cuda:0"], ["cuda:0", "cpu"]], ids=["cuda-cuda", "cuda-cpu"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cuda_draws_replay_under_recompute(schedule, devices, layer):
    """On CUDA, dropout (fused native_dropout), cuDNN's LSTM dropout: the device generator's stream."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), layer(), nn.Linear(6, 6), layer()).double()
    x, y = data(8, 5, 6)
    assert_replayed(model, schedule, x, y, devices=devices)


@pytest.mark.cuda
@needs_cuda
def test_escaped_draw_on_a_cuda_generator_raises_naming_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), Untagged()).double()
    x, y = data(8, 6)
    with pytest.raises(RuntimeError, match=r"stage 1, micro-batch \d: torch's cuda:0 random generator moved"):
        grads_under(model, "1f1b", "always", x, y, devices=["cuda:0", "cuda:0"])



def test_two_pipelines_stepping_at_once_raise_no_false_alarm():
    """A step's seed is drawn holding the generator's lock, as a counted move of its live state:
    another pipeline stepping meanwhile neither loses numbers of its streams to it nor mistakes
    it for an escaped draw (its watched forwards check the live state)."""

    class Quiet(nn.Module):  # watched, never drawing: its forwards check the live state
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 6)

        def forward(self, x: Tensor) -> Tensor:
            return self.linear(x).tanh()

    torch.manual_seed(0)
    models = [nn.Sequential(Quiet(), nn.Dropout(0.5), Quiet(), nn.Dropout(0.5)).double() for _ in range(2)]
    x, y = data(16, 6)
    go, errors = threading.Barrier(2), []

    def train(model: nn.Module) -> None:
        try:
            with Pipeline(model, schedule="1f1b", balance=[2, 2], devices=CPU, chunks=4, checkpoint="always",
                          loss_fn=nn.MSELoss()) as pipe:
                go.wait()
                for _ in range(20):
                    pipe.step(x, y)
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=train, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
