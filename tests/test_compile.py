"""torch.compile: the pipeline refuses it at once; pipe.compile() compiles every stage instead.

Backend "eager" keeps these fast: Dynamo still captures each stage's graph (what
could go wrong in the pipeline), without code generation.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import assert_grads_equal, mlp, reference_grads
from torch import nn
from torch._dynamo.utils import counters

from pipesched import Pipeline
from pipesched.runtime.saved_tensor_meter import SavedTensorMeter
from pipesched.runtime.saved_tensors import SavedBox


def data(rows=12):
    g = torch.Generator().manual_seed(2)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (rows,), generator=g)


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_torch_compile_of_a_pipeline_is_refused_at_once_naming_pipe_compile():
    """torch.compile(pipe) used to fail deep inside Dynamo ('frozenset not in co_names')."""
    model = mlp(layers=4)
    x, y = data()
    with Pipeline(model, balance=[2, 2], chunks=2, loss_fn=nn.CrossEntropyLoss()) as pipe:
        with pytest.raises(RuntimeError, match=r"torch.compile cannot trace a Pipeline.*pipe.compile\("):
            torch.compile(pipe, backend="eager")(x)
        with pytest.raises(RuntimeError, match="pipe.compile"):
            torch.compile(pipe.step, backend="eager", fullgraph=True)(x, y)
        _, expected = reference_grads(model, nn.CrossEntropyLoss(), x, y)
        pipe.step(x, y)  # the pipeline itself is untouched
    assert_grads_equal(model, expected)


@pytest.mark.parametrize("schedule,balance", [("gpipe", [1, 1, 1, 1, 1]), ("1f1b", [3, 2])])
def test_compiled_stages_give_the_unpipelined_gradients(schedule, balance):
    """nn.Module.compile on a stage of built-in layers compiles nothing (Dynamo does not start
    tracing in torch.nn frames); pipe.compile() must capture every stage, in both grad modes,
    however many stages (Dynamo caches at most 8 variants of one code object)."""
    model = mlp(layers=5)
    x, y = data()
    backend = CountingBackend()
    counters.clear()
    with Pipeline(model, schedule=schedule, balance=balance, chunks=3, checkpoint="except_last",
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.compile(backend=backend)
        _, expected = reference_grads(model, nn.CrossEntropyLoss(), x, y)
        pipe.step(x, y)
        with torch.no_grad():
            torch.testing.assert_close(pipe(x), model(x), rtol=0, atol=1e-12)
    assert_grads_equal(model, expected)
    assert backend.graphs >= 2 * len(balance)  # every stage, with and without grad
    assert counters["stats"]["unique_graphs"] == backend.graphs


def test_a_stage_with_a_graph_break_keeps_the_pipelines_hooks_out_of_dynamo():
    """Around a graph break the stage's ops run eagerly under Dynamo's callback: the pipeline's
    saved-tensor meter hook was traced and recompiled for every new tensor (recompile limit)."""

    class Break(nn.Module):
        def forward(self, x):
            y = x.tanh()
            print(end="")  # Dynamo cannot trace print: a graph break
            return y.sin()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), Break(), nn.Linear(12, 4)).double()
    x, y = data()
    with Pipeline(model, balance=[2, 1], chunks=3, checkpoint="never", loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.compile(backend="eager")
        _, expected = reference_grads(model, nn.CrossEntropyLoss(), x, y)
        pipe.step(x, y)
    assert_grads_equal(model, expected)
    for code in (SavedTensorMeter.count.__code__, SavedBox.__init__.__code__):
        assert not torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)


class WaitForCompile(nn.Module):
    """On its second forward of 5-row micro-batches (F0.1 of the second step), waits until
    rank 1 starts compiling for the new shape, so that this stage's dropout draws while rank 1
    compiles. Dynamo runs it as plain Python (disabled), not as part of the stage's graph."""

    def __init__(self, started: threading.Event | None):
        super().__init__()
        self.started, self.calls = started, 0

    @torch.compiler.disable
    def forward(self, x):
        if self.started is not None and x.shape[0] == 5 and not torch.is_grad_enabled():
            self.calls += 1
            if self.calls == 2:
                self.started.wait(timeout=1.0)  # with the fix, that compilation waits for us instead
        return x


def test_compiling_a_stage_does_not_rewind_another_ranks_dropout():
    """Dynamo restores the global generator after each compilation: a rank compiling (stage 1,
    first micro-batch of a new shape) while a dropout stage drew on another rank rewound those
    draws, so the masks differed from the uncompiled run and could differ from the ones a
    recompute replays."""
    from torch._dynamo.callback import callback_handler

    started = threading.Event()
    rank1_compiles = []

    def on_start(args):
        if threading.current_thread().name == "pipesched-rank1":
            rank1_compiles.append(args)
            if len(rank1_compiles) == 3:  # 1, 2: step 1 without and with grad; 3: the new shape
                started.set()

    def run(compiled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), WaitForCompile(started if compiled else None),
                              nn.Dropout(0.3), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4)).double()
        with Pipeline(model, schedule="1f1b", balance=[4, 3], chunks=3, checkpoint="always",
                      loss_fn=nn.CrossEntropyLoss()) as pipe:
            if compiled:
                pipe.compile(backend="eager")
            torch.manual_seed(7)
            losses = [pipe.step(*data(rows)) for rows in (12, 15)]  # 4-row, then 5-row micro-batches
        return losses, [p.grad for p in model.parameters()]

    want_losses, want_grads = run(compiled=False)
    torch._dynamo.reset()  # an earlier test's compiled Sequential.forward would spare rank 1 a compilation
    callback_handler.register_start_callback(on_start)
    try:
        losses, grads = run(compiled=True)
    finally:
        callback_handler.remove_start_callback(on_start)
    assert len(rank1_compiles) >= 3
    assert losses == want_losses
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


_TWO_COMPILED_PIPELINES = r"""
import threading, torch
from torch import nn
from pipesched import Pipeline

def compiled_step(schedule, balance):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(12, 8, dtype=torch.float64), torch.randint(0, 4, (12,))
    with Pipeline(model, schedule=schedule, balance=balance, chunks=3, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.compile(backend="eager")
        pipe.step(x, y)

compiled_step("gpipe", [1, 1, 1, 1, 1])
compiled_step("1f1b", [3, 2])  # its workers compile after the first pipeline's have exited
done = []
fresh = threading.Thread(target=lambda: done.append(torch.compile(lambda t: t.sin(), backend="eager")(torch.ones(2))))
fresh.start(); fresh.join()
assert done, "the compilation on a fresh thread raised"
print("compiled", torch.__version__, torch.cuda._is_compiled(), torch.cuda.is_available())
"""


def test_a_second_compiled_pipeline_does_not_segfault_on_a_cuda_build_without_a_device():
    """torch keeps the fake CUDA device guard that fake-tensor mode installs (CUDA wheel, no GPU)
    in a thread-local of the first thread to compile, a rank's worker, and publishes its address:
    after that pipeline closed, the next compilation in the process crashed (SIGSEGV, torch 2.11's
    CUDA wheel on a CPU machine). In a subprocess, so a crash fails this test instead of pytest.
    A CPU build of torch, or a machine with a GPU, never takes that path: there it passes either way."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _TWO_COMPILED_PIPELINES],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("compiled"), result.stdout
