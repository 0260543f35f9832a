"""Split backwards (B, then W) against the un-pipelined model when hooks, custom Functions, compiled
stages or reentrant checkpoints sit inside a stage (issue 21).

Every case runs a float64 model through a Pipeline on CPU ranks under each split schedule the
stage count allows, with 1f1b (whole backwards) as the control, and compares the parameter
gradients (and what hooks saw) with one plain backward of a deepcopy.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

from pipesched import Pipeline
from pipesched.runtime import split_backward, whole_backward

SCHEDULES = [("1f1b", 3, [3, 3, 2]), ("zb-h1", 3, [3, 3, 2]), ("zb-v", 2, [2, 2, 2, 2]),
             ("interleaved-zb", 2, [2, 2, 2, 2])]
IDS = [s[0] for s in SCHEDULES]


def batch(rows: int = 12):
    g = torch.Generator().manual_seed(5)
    return torch.randn(rows, 8, dtype=torch.float64, generator=g), torch.randint(0, 4, (rows,), generator=g)


def run_both(model: nn.Module, name: str, ranks: int, balance: list[int], chunks: int = 3, **options):
    """The plain model's loss.backward() on a deepcopy, then one Pipeline step on ``model``; returns the copy."""
    reference = copy.deepcopy(model)
    x, y = batch()
    nn.CrossEntropyLoss()(reference(x), y).backward()
    with Pipeline(model, schedule=name, balance=balance, devices=["cpu"] * ranks, chunks=chunks,
                  checkpoint="never", loss_fn=nn.CrossEntropyLoss(), **options) as pipe:
        pipe.step(x, y)
    return reference


def assert_same_grads(model: nn.Module, reference: nn.Module, atol: float = 1e-12) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None, f"{name} got no gradient"
        ratio = (p.grad.norm() / q.grad.norm()).item()
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=atol, msg=f"{name}: {ratio:.3f}x the plain gradient")


class ScaledLinear(torch.autograd.Function):
    """A custom autograd Function with a weight: its backward node is a Python one."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return 2.0 * x @ weight.t()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        return (2.0 * grad @ weight if ctx.needs_input_grad[0] else None,
                2.0 * grad.t() @ x if ctx.needs_input_grad[1] else None)


class CustomLayer(nn.Module):
    """A layer computed by ScaledLinear, with an optional hook and retain_grad() on its output."""

    def __init__(self, width: int, hook=None, retain: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width, dtype=torch.float64) / width)
        self.hook, self.retain, self.outputs = hook, retain, []

    def forward(self, x: Tensor) -> Tensor:
        h = ScaledLinear.apply(x, self.weight)
        if h.requires_grad:
            if self.hook is not None:
                h.register_hook(self.hook)
            if self.retain:
                h.retain_grad()
                self.outputs.append(h)
        return h


def custom_model(**layer) -> nn.Sequential:
    """Custom layers at the start of a stage (its input a stage input) and inside one, in every balance used."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), CustomLayer(12, **layer), nn.Tanh(), CustomLayer(12, **layer),
                         nn.Tanh(), CustomLayer(12, **layer), nn.Tanh(), nn.Linear(12, 4)).double()


@pytest.mark.parametrize("name,ranks,balance", SCHEDULES, ids=IDS)
def test_tensor_hook_on_custom_function_output_runs_once_under_split_backward(name, ranks, balance):
    """B kept the hooked gradient; W used to run the node in an engine call that ran the hook again (2x)."""
    model = custom_model(hook=lambda g: 2 * g)
    assert_same_grads(model, run_both(model, name, ranks, balance))


@pytest.mark.parametrize("name,ranks,balance", SCHEDULES, ids=IDS)
def test_retain_grad_on_custom_function_output_is_not_doubled(name, ranks, balance):
    """retain_grad() is a tensor hook too: W's engine call used to add a second copy (h.grad 2x)."""
    model = custom_model(retain=True)
    reference = run_both(model, name, ranks, balance)
    assert_same_grads(model, reference)
    for index in (1, 3, 5):
        (expected,) = reference[index].outputs
        got = torch.cat([h.grad for h in model[index].outputs])  # one per micro-batch, in order
        torch.testing.assert_close(got, expected.grad, rtol=0, atol=1e-12, msg=f"layer {index}'s retained grad")


def _halve_grad_input(module, grad_input, grad_output):
    return tuple(None if g is None else 0.5 * g for g in grad_input)


def hooked_mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12),
                         nn.Tanh(), nn.Linear(12, 12), nn.Linear(12, 4)).double()


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook")  # torch's, on every backward
@pytest.mark.parametrize("name,ranks,balance", SCHEDULES, ids=IDS)
def test_legacy_module_backward_hook_under_split_backward(name, ranks, balance):
    """A legacy hook's return value used to reach only the input gradient under B/W (2.0x weight and bias)."""
    model = hooked_mlp()
    for index in (2, 4, 6):  # a stage's first layer, a middle one, and one whose input is a stage input
        model[index].register_backward_hook(_halve_grad_input)
    assert_same_grads(model, run_both(model, name, ranks, balance))


@pytest.mark.parametrize("name,ranks,balance", SCHEDULES, ids=IDS)
def test_full_backward_hooks_that_change_gradients_under_split_backward(name, ranks, balance):
    model = hooked_mlp()
    model[2].register_full_backward_hook(_halve_grad_input)
    model[4].register_full_backward_pre_hook(lambda module, grad_output: (3.0 * grad_output[0],))
    model[6].register_full_backward_hook(_halve_grad_input)
    model[7].register_full_backward_pre_hook(lambda module, grad_output: (-grad_output[0],))
    assert_same_grads(model, run_both(model, name, ranks, balance))


class ReentrantBlock(nn.Module):
    """torch.utils.checkpoint(use_reentrant=True) around an inner block, as many Hugging Face layers do."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x: Tensor) -> Tensor:
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=True)


@pytest.mark.parametrize("name,ranks,balance", SCHEDULES, ids=IDS)
def test_reentrant_checkpoint_inside_layer_under_split_backward(name, ranks, balance, monkeypatch):
    """torch refuses autograd.grad through a reentrant checkpoint: B used to fail with torch's error.
    Now such a stage's B runs its whole backward (exact) and says so once, naming use_reentrant=False."""
    monkeypatch.setattr(whole_backward, "_warned", set())
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 12), ReentrantBlock(12), nn.Tanh(), ReentrantBlock(12), nn.Tanh(),
                          nn.Linear(12, 12), ReentrantBlock(12), nn.Linear(12, 4)).double()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        reference = run_both(model, name, ranks, balance)
    assert_same_grads(model, reference)
    ours = sorted(str(w.message) for w in said if "runs whole in B" in str(w.message))
    starts = [sum(balance[:s]) for s in range(len(balance) + 1)]
    stages = {s for s in range(len(balance)) for i in (1, 3, 6) if starts[s] <= i < starts[s + 1]}
    assert len(ours) == (0 if name == "1f1b" else len(stages)), ours  # once per such stage, not per micro-batch
    assert all("use_reentrant=False" in message for message in ours), ours


def _stack_and_reference(hook=None):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    if hook is not None:
        model[2].register_backward_hook(hook)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 6, dtype=torch.float64)
    reference, x_ref = copy.deepcopy(model), x.detach().clone().requires_grad_(True)
    reference(x_ref).backward(grad)
    return model, x, grad, reference, x_ref


def test_reentrant_checkpoint_makes_b_run_the_whole_backward(monkeypatch):
    """backward_input itself: torch refuses autograd.grad through a reentrant checkpoint: B runs whole, W empty."""
    monkeypatch.setattr(whole_backward, "_warned", set())
    model, x, grad, reference, x_ref = _stack_and_reference()
    out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=True)
    with pytest.warns(UserWarning, match=r"reentrant torch.utils.checkpoint.*use_reentrant=False"):
        (x_grad,), work = split_backward.backward_input([out], [grad], [x], model.parameters())
    assert work.empty and x.grad is None, "B's whole backward must leave the input's .grad as it was"
    torch.testing.assert_close(x_grad, x_ref.grad, rtol=0, atol=1e-12)
    assert_same_grads(model, reference)


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook")
@pytest.mark.parametrize("where", ["module", "global"])
def test_a_legacy_module_backward_hook_makes_b_run_the_whole_backward(monkeypatch, where):
    """backward_input itself: B runs whole, exact, and says why once, naming the stage, the module and the fix."""
    monkeypatch.setattr(whole_backward, "_warned", set())
    if where == "global":
        handle = nn.modules.module.register_module_backward_hook(lambda m, gi, go: None)
        try:
            model, x, grad, reference, _ = _stack_and_reference()
            with pytest.warns(UserWarning, match="global legacy register_module_backward_hook"):
                _, work = split_backward.backward_input([model(x)], [grad], [x], model.parameters(), module=model)
        finally:
            handle.remove()
        assert work.empty
        assert_same_grads(model, reference)
        return
    model, x, grad, reference, _ = _stack_and_reference(hook=_halve_grad_input)
    for attempt in range(2):
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            _, work = split_backward.backward_input([model(x)], [grad], [x], model.parameters(), module=model,
                                                    name="stage 1")
        assert work.empty
        ours = [str(w.message) for w in said if "runs whole" in str(w.message)]
        assert len(ours) == 1 - attempt, ours
        if ours:
            assert "stage 1" in ours[0] and "module '2' has a legacy register_backward_hook" in ours[0]
            assert "register_full_backward_hook" in ours[0]
        assert_same_grads(model, reference)


def _counting_backend(counts: dict[str, int]):
    """An aot_autograd backend whose compiled backward graphs count their calls."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(gm, example_inputs):
        return make_boxed_func(gm.forward)

    def backward_compiler(gm, example_inputs):
        def run(*args):
            counts["backward"] += 1
            return gm(*args)
        return make_boxed_func(run)

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler)


@pytest.mark.parametrize("name,ranks,balance", [("1f1b", 2, [3, 2]), ("zb-h1", 2, [3, 2]), ("zb-v", 2, [2, 1, 1, 1])],
                         ids=["1f1b", "zb-h1", "zb-v"])
def test_compiled_stage_backward_runs_once_under_zero_bubble(name, ranks, balance):
    """A compiled stage is one custom Function node: W used to run its whole backward again (12 calls, not 8)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    reference = copy.deepcopy(model)
    x, y = batch()
    nn.CrossEntropyLoss()(reference(x), y).backward()
    counts = {"backward": 0}
    chunks = 4
    with Pipeline(model, schedule=name, balance=balance, devices=["cpu"] * ranks, chunks=chunks,
                  checkpoint="never", loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.compile(backend=_counting_backend(counts))
        pipe.step(x, y)
        counts["backward"] = 0  # the first step compiled; count a second one
        model.zero_grad()
        pipe.step(x, y)
    assert_same_grads(model, reference)
    assert counts["backward"] == len(balance) * chunks, f"{counts['backward']} backward-graph calls"


class _PlainBackend:
    """A torch.compile backend that runs the captured graph as is (no AOTAutograd)."""

    def __call__(self, gm, example_inputs):
        return gm.forward


def test_compiled_stage_with_donated_buffers_under_zero_bubble():
    """AOTAutograd's donated buffers refuse a backward that keeps its graph (retain_graph=True), and B used to
    keep it whenever W had work. Seen after another compiled pipeline ran in the process (the suite's order)."""
    torch.manual_seed(3)
    first = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    x, y = batch()
    with Pipeline(first, schedule="1f1b", balance=[2, 1], devices=["cpu"] * 2, chunks=3,
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.compile(backend=_PlainBackend())
        pipe.step(x, y)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    reference = copy.deepcopy(model)
    nn.CrossEntropyLoss()(reference(x), y).backward()
    with Pipeline(model, schedule="zb-h1", balance=[3, 2], devices=["cpu"] * 2, chunks=4, checkpoint="never",
                  loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.compile(backend=_counting_backend({"backward": 0}))
        pipe.step(x, y)
    assert_same_grads(model, reference)


class _KeepGraphProbe(torch.autograd.Function):
    """ScaledLinear that records whether the running engine call keeps the graph."""

    seen: list[bool] = []

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        return ScaledLinear.forward(ctx, x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        _KeepGraphProbe.seen.append(torch._C._autograd._get_current_graph_task_keep_graph())
        return ScaledLinear.backward(ctx, grad)


def test_b_does_not_keep_the_graph_when_w_calls_no_node_b_ran():
    """With only custom Function nodes on the frontier (a compiled stage), nothing B ran runs again: B's engine
    call must not keep the graph (retain_graph=False), or a compiled backward with donated buffers refuses."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 6, dtype=torch.float64))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    _KeepGraphProbe.seen = []
    out = _KeepGraphProbe.apply(torch.tanh(x), weight)
    _, work = split_backward.backward_input([out], [torch.ones(4, 6, dtype=torch.float64)], [x], [weight])
    assert _KeepGraphProbe.seen == [False]
    work.run()
    expected = 2.0 * torch.ones(6, 4, dtype=torch.float64) @ torch.tanh(x).detach()
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=1e-12)
