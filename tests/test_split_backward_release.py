"""What a split backward frees, and when: with the caller's saved-tensor hooks, under the
activation meter, and after a failed step. Counted with weakrefs, never with timings."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, reference_grads
from pipesched import Pipeline

LOSS = nn.MSELoss()


def tanh_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()


def data(rows: int = 8):
    g = torch.Generator().manual_seed(2)
    return torch.randn(rows, 4, dtype=torch.float64, generator=g), torch.randn(rows, 4, dtype=torch.float64, generator=g)


def live(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is not None for ref in refs)


def test_identity_saved_tensors_hooks_do_not_leak_under_split_backward():
    """Regression: the caller's pack hook saw a tanh's output with its ``grad_fn``; returned as is, the
    node held its own output, a cycle only running the node breaks. W never runs the input path, so
    every zero-bubble step's stage graphs stayed alive: 3, 7, 11, 15, 19 tanh outputs after steps 1-5."""
    model = tanh_model()
    outputs: list[weakref.ref] = []
    for layer in model:
        if isinstance(layer, nn.Tanh):
            layer.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    packed: list[type] = []

    def pack(tensor):
        packed.append(type(tensor))
        return tensor

    x, y = data()
    counts = []
    with Pipeline(model, schedule="zb-h1", balance=[2, 2, 1], devices=["cpu"] * 3, chunks=4, checkpoint="never",
                  loss_fn=LOSS) as pipe:
        for _ in range(5):
            model.zero_grad()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                pipe.step(x, y)
            counts.append(live(outputs))
    assert counts == [0] * 5
    assert packed and set(packed) == {torch.Tensor}  # the caller's hooks still see every saved tensor
    _, want = reference_grads(model, LOSS, x, y)
    assert_grads_equal(model, want)


def gelu_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 6), nn.GELU(),
                         nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 6), nn.GELU()).double()


@pytest.mark.parametrize("meter,step", [("every", 1), ("every", 2), ("once", 1), ("once", 2)])
def test_activation_meter_every_keeps_early_release(meter, step):
    """Regression: a metered forward's saved tensors sat behind the meter's own saved-tensor hooks,
    which B's release skipped: under ``activation_meter="every"`` (and the first step under
    ``"once"``) every GELU input stayed alive from B until W, so the audit changed what it audited.

    Census: while W(stage, m) runs (a post-accumulate-grad hook on the stage's first weight),
    no GELU input of micro-batch m (only its input path needed them; its B ran) is alive.
    """
    model = gelu_model()
    chunks, stages = 4, [model[0:4], model[4:8]]
    inputs: dict[int, list[weakref.ref]] = {0: [], 1: []}
    alive_in_w: list[int] = []
    for s, stage in enumerate(stages):
        for layer in stage:
            if isinstance(layer, nn.GELU):
                layer.register_forward_pre_hook(  # the storage: a saved alias keeps it, not the tensor object
                    lambda module, args, s=s: inputs[s].append(weakref.ref(args[0].untyped_storage())))
        fired = [0]

        def in_w(param, s=s, fired=fired):
            m = fired[0] % chunks  # W of one stage runs in micro-batch order; 2 GELUs per micro-batch
            alive_in_w.append(sum(ref() is not None for ref in inputs[s][2 * m:2 * m + 2]))
            fired[0] += 1

        stage[0].weight.register_post_accumulate_grad_hook(in_w)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    reference = copy.deepcopy(model)
    with Pipeline(model, schedule="zb-h1", balance=[4, 4], devices=["cpu"] * 2, chunks=chunks, checkpoint="never",
                  loss_fn=LOSS, activation_meter=meter) as pipe:
        for _ in range(step):
            model.zero_grad()
            for refs in inputs.values():
                refs.clear()
            alive_in_w.clear()
            pipe.step(x, y)
            report = pipe.last_report
    assert len(alive_in_w) == 2 * chunks
    assert alive_in_w == [0] * (2 * chunks), f"GELU inputs alive during W: {alive_in_w}"
    assert report.peak_activation_bytes[0] > 0
    _, want = reference_grads(reference, LOSS, x, y)
    assert_grads_equal(model, want)


def test_failed_zero_bubble_step_releases_its_graphs():
    """Regression (review §4.6): ``WeightWork.release()`` was never called, so a failed zero-bubble
    step's graphs (pending W work, forwards not yet backwarded) stayed alive until the next step:
    the workers kept their last job (and the aborted ranks' errors, whose tracebacks hold their
    tasks' frames), and the raised error's traceback kept the step's context."""
    model = tanh_model()
    outputs: list[weakref.ref] = []
    for layer in model:
        layer.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    calls = [0]

    def failing_loss(out, target):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("loss failed on purpose")
        return LOSS(out, target)

    x, y = data()
    with Pipeline(model, schedule="zb-h1", balance=[2, 2, 1], devices=["cpu"] * 3, chunks=4, checkpoint="never",
                  loss_fn=failing_loss) as pipe:
        try:
            pipe.step(x, y)
        except RuntimeError as error:
            held = error
        assert "loss failed on purpose" in str(held)
        # while the caller holds the error, only what its own frames hold: the failing loss's input
        assert live(outputs) == 1
        del held
        assert live(outputs) == 0
        assert all(p.grad is None for p in model.parameters())  # and the step changed nothing
        calls[0] = -100
        pipe.step(x, y)
    _, want = reference_grads(model, LOSS, x, y)
    assert_grads_equal(model, want)
