"""Split backward (issue #12): B = input gradients, W = parameter gradients, against the plain backward.

Every case runs the same float64 model twice: a deepcopy through the plain
``torch.autograd.backward(roots, grad_roots)`` (and ``torch.autograd.grad``
for the input gradients), and the original through ``backward_input`` then
``WeightWork.run``. B must leave every ``.grad`` alone, W must make them equal
the plain backward's. Node hooks check that each half runs only its own part
of the graph, weak references that B and W release what they no longer need.
"""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.flop_counter import FlopCounterMode

from pipesched.runtime.split_backward import backward_input

ATOL = 1e-12
Run = Callable[[nn.Module, Sequence[Tensor]], list[Tensor]]


def _sequential(model: nn.Module, inputs: Sequence[Tensor]) -> list[Tensor]:
    return [model(*inputs)]


def _clone_inputs(inputs: Sequence[Tensor]) -> list[Tensor]:
    return [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]


def _grads_for(roots: Sequence[Tensor], scalar: bool, seed: int = 7) -> list[Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    if scalar:
        return [None] * len(roots)
    return [torch.randn(r.shape, generator=generator, dtype=torch.float64).to(r.dtype) for r in roots]


def check_split(
    model: nn.Module, inputs: Sequence[Tensor], run: Run = _sequential, scalar: bool = False, atol: float = ATOL
) -> tuple[tuple[Tensor | None, ...], nn.Module]:
    """B then W on ``model`` against the plain backward on a deepcopy; returns B's input grads and the reference."""
    reference, ref_inputs = copy.deepcopy(model), _clone_inputs(inputs)
    for p, q in zip(model.parameters(), reference.parameters()):  # deepcopy leaves .grad behind
        q.grad = None if p.grad is None else p.grad.clone()
    ref_roots = run(reference, ref_inputs)
    grad_roots = _grads_for(ref_roots, scalar)
    wanted = [x for x in ref_inputs if x.requires_grad]
    by_grad = torch.autograd.grad(ref_roots, wanted, grad_roots, retain_graph=True, allow_unused=True) if wanted else ()
    torch.autograd.backward(ref_roots, grad_roots)

    before = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    split_inputs = _clone_inputs(inputs)
    roots = run(model, split_inputs)
    input_grads, work = backward_input(roots, grad_roots, split_inputs, model.parameters())
    for name, p in model.named_parameters():  # B: no parameter gradient yet
        assert (p.grad is None and before[name] is None) or torch.equal(p.grad, before[name]), name
    assert all(x.grad is None for x in split_inputs), "B returns input gradients, it does not accumulate them"

    assert len(input_grads) == len(inputs)
    grads_by_grad = iter(by_grad)
    for i, (x, got) in enumerate(zip(ref_inputs, input_grads)):
        if not x.requires_grad:
            assert got is None, f"input {i} does not require grad"
            continue
        expected = next(grads_by_grad)
        if expected is None:
            assert got is None and x.grad is None, f"input {i} is unused"
            continue
        torch.testing.assert_close(got, expected, rtol=0, atol=atol, msg=f"input {i} vs autograd.grad")
        torch.testing.assert_close(got, x.grad, rtol=0, atol=atol, msg=f"input {i} vs autograd.backward")

    work.run()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        if expected is None:
            assert p.grad is None, f"{name} gets no gradient from a plain backward, but got one"
        else:
            assert p.grad is not None, f"{name} got no gradient"
            assert p.grad.layout == expected.layout, name
            got = p.grad.to_dense() if p.grad.is_sparse else p.grad
            torch.testing.assert_close(got, expected.to_dense(), rtol=0, atol=atol, msg=name)
    return input_grads, reference


def linear_stack(layers: int = 3, width: int = 6, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*mods).double()


def x_(*shape: int, grad: bool = True, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(grad)


# --- the cases the issue lists -------------------------------------------------------------


def test_linear_stack_with_output_gradient():
    check_split(linear_stack(), [x_(4, 6)])


def test_scalar_loss_root_without_gradient():
    model = linear_stack()
    target = x_(4, 6, grad=False, seed=3)
    check_split(model, [x_(4, 6)], run=lambda m, xs: [F.mse_loss(m(*xs), target)], scalar=True)


def test_tuple_outputs_each_with_its_gradient():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            h = torch.tanh(self.body(x))
            return self.a(h), self.b(h) * x[:, :2]

    torch.manual_seed(0)
    check_split(TwoHeads().double(), [x_(4, 6)], run=lambda m, xs: list(m(*xs)))


def test_root_that_reaches_no_input_still_gets_its_weight_work():
    """A second output computed from parameters alone (no path to the input): W seeds it from its root."""

    class WithBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.offset = nn.Linear(6, 6), nn.Parameter(torch.randn(3))

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.lin(x), torch.sin(self.offset) * 2

    torch.manual_seed(0)
    check_split(WithBias().double(), [x_(4, 6)], run=lambda m, xs: list(m(*xs)))


def test_first_stage_input_without_grad_leaves_all_weight_work_to_w():
    model = linear_stack()
    (grad,), _ = check_split(model, [x_(4, 6, grad=False)])
    assert grad is None
    roots = [model(x_(4, 6, grad=False))]
    _, work = backward_input(roots, _grads_for(roots, False), [x_(4, 6, grad=False)], model.parameters())
    assert not work.empty and work.nbytes() > 0


def test_inputs_not_requiring_grad_and_unused_inputs():
    model = linear_stack()
    run: Run = lambda m, xs: [m(xs[0] * xs[1])]
    grads, _ = check_split(model, [x_(4, 6), x_(4, 6, grad=False, seed=2), x_(4, 6, seed=3)], run=run)
    assert grads[0] is not None and grads[1] is None and grads[2] is None


def test_parameters_not_reached_stay_untouched():
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused, self.frozen = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
            self.frozen.requires_grad_(False)

        def forward(self, x: Tensor) -> Tensor:
            return self.frozen(torch.relu(self.used(x)))

    torch.manual_seed(0)
    model = Partial().double()
    model.unused.weight.grad = torch.full_like(model.unused.weight, 5.0)  # an earlier micro-batch's
    check_split(model, [x_(4, 6)])
    assert torch.equal(model.unused.weight.grad, torch.full_like(model.unused.weight, 5.0))
    assert model.unused.bias.grad is None and model.frozen.weight.grad is None


def test_gradients_accumulate_over_earlier_ones():
    model = linear_stack()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    check_split(model, [x_(4, 6)])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_shared_twice_within_the_stage(kind: str):
    """One module applied twice on the input's path: both uses accumulate into its parameters."""
    torch.manual_seed(0)
    if kind == "linear":
        shared = nn.Linear(6, 6)
        model, x = nn.Sequential(shared, nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), shared), x_(4, 6)
    else:
        shared = nn.Conv2d(2, 2, 3, padding=1)
        model, x = nn.Sequential(shared, nn.ReLU(), shared, nn.Tanh()), x_(2, 2, 5, 5)
    check_split(model.double(), [x])


def test_parameter_shared_through_a_functional_use():
    """The same weight in a linear layer and, transposed, in a later product (tied weights)."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(6, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.proj(x))
            return h @ self.proj.weight + x * self.proj.weight.sum(0)

    torch.manual_seed(0)
    check_split(Tied().double(), [x_(5, 6)])


def test_stage_without_parameters_has_an_empty_w():
    model = nn.Sequential(nn.GELU(), nn.Tanh())
    check_split(model, [x_(4, 6)])
    roots = [model(x_(4, 6))]
    _, work = backward_input(roots, _grads_for(roots, False), [x_(4, 6)], model.parameters())
    assert work.empty and work.nbytes() == 0
    work.run()  # a no-op


def test_conv_batch_norm_layer_norm_stack():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.LayerNorm([4, 4, 4]), nn.GELU(),
    ).double()
    check_split(model, [x_(2, 3, 6, 6)])


@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_with_a_float_input(sparse: bool):
    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.lin = nn.Embedding(10, 6, sparse=sparse), nn.Linear(6, 6)

        def forward(self, ids: Tensor, h: Tensor) -> Tensor:
            return self.lin(self.emb(ids) + h)

    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 3], [3, 9, 0]])
    check_split(Embed().double(), [ids, x_(2, 3, 6)])
    check_split(Embed().double(), [ids, x_(2, 3, 6, grad=False)])  # first stage: ids and a constant


def test_autocast_bfloat16_forward_is_bitwise_equal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))

    def run(m: nn.Module, xs: Sequence[Tensor]) -> list[Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [m(*xs)]

    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    check_split(model, [x], run=run, atol=0)


def test_roots_whose_data_was_emptied_after_sending():
    """The engine empties a sent output's data; shapes are checked against the graph instead."""
    model = linear_stack()
    reference = copy.deepcopy(model)
    x, xr = x_(4, 6), x_(4, 6)
    out = model(x)
    out.data = torch.empty(0, dtype=out.dtype)
    grad = _grads_for([reference(xr)], False)
    (gx,), work = backward_input([out], grad, [x], model.parameters())
    work.run()
    torch.autograd.backward([reference(xr)], grad)
    torch.testing.assert_close(gx, xr.grad, rtol=0, atol=ATOL)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=ATOL)


def test_two_stages_in_zero_bubble_order():
    """B of the last stage, B of the first with its input gradient, then both W: the whole model's gradients."""
    torch.manual_seed(0)
    first, second = linear_stack(2, seed=1), nn.Sequential(nn.Linear(6, 3), nn.Tanh()).double()
    reference = copy.deepcopy(nn.Sequential(first, second))
    x, target = x_(4, 6, grad=False), x_(4, 3, grad=False, seed=5)
    F.mse_loss(reference(x), target).backward()

    h = first(x)
    h_in = h.detach().requires_grad_()
    loss = F.mse_loss(second(h_in), target)
    (g_h,), w_second = backward_input([loss], None, [h_in], second.parameters())
    (g_x,), w_first = backward_input([h], [g_h], [x], first.parameters())
    assert g_x is None
    w_second.run()
    w_first.run()
    for p, q in zip(nn.Sequential(first, second).parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=ATOL)


# --- each half does only its own work ------------------------------------------------------


def _graph_nodes(roots: Sequence[Tensor]) -> list[torch.autograd.graph.Node]:
    seen, todo = {}, [r.grad_fn for r in roots]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen[node] = True
        todo += [c for c, _ in node.next_functions]
    return list(seen)


def _reaching(nodes: Sequence[torch.autograd.graph.Node], targets: set) -> set:
    """The nodes from which one of ``targets`` can be reached by at least one edge."""
    found: set = set()
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node not in found and any(c in targets or c in found for c, _ in node.next_functions if c is not None):
                found.add(node)
                changed = True
    return found


def _flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _assert_each_half_does_its_own_work(
    model: nn.Module, inputs: Sequence[Tensor], run: Run = _sequential
) -> tuple[dict[str, int], dict[str, set]]:
    """B and W split one backward's work: their FLOPs add up to it, and each runs only its side of the graph.

    FLOPs (``FlopCounterMode``: matrix products, convolutions) of the plain
    backward on a deepcopy against B's and W's. Post-hooks on every node
    record which nodes the engine runs in each half: B only nodes from which
    an input can be reached ("input side"), W only the others. (W calls the
    frontier nodes, the layers' own backward, directly: no hook sees that;
    the FLOPs do.) A custom autograd Function computes its whole backward
    in B (what ``needs_input_grad`` says), once: W uses its weight side.
    """
    reference, ref_inputs = copy.deepcopy(model), _clone_inputs(inputs)
    ref_roots = run(reference, ref_inputs)
    grad_roots = _grads_for(ref_roots, scalar=ref_roots[0].numel() == 1)
    full = _flops(lambda: torch.autograd.backward(ref_roots, grad_roots))

    split_inputs = _clone_inputs(inputs)
    roots = run(model, split_inputs)
    params = list(model.parameters())
    nodes = set(_graph_nodes(roots)) | {get_gradient_edge(p).node for p in params if p.requires_grad}
    input_nodes = {get_gradient_edge(x).node for x in split_inputs if x.requires_grad}
    input_side = _reaching(list(nodes), input_nodes) | input_nodes
    phase = ["B"]
    ran: dict[str, set] = {"B": set(), "W": set()}
    handles = [n.register_hook(lambda gi, go, n=n: ran[phase[0]].add(n)) for n in nodes]
    try:
        works = []
        flops = {"full": full, "B": _flops(lambda: works.append(backward_input(roots, grad_roots, split_inputs, params)))}
        phase[0] = "W"
        flops["W"] = _flops(works[0][1].run)
    finally:
        for h in handles:
            h.remove()
    assert flops["B"] + flops["W"] == flops["full"], flops
    assert ran["B"] <= input_side, f"B ran weight-side nodes {sorted(n.name() for n in ran['B'] - input_side)}"
    wrong = ran["W"] & input_side
    assert not wrong, f"W ran input-side nodes {sorted(n.name() for n in wrong)}"
    return flops, ran


@pytest.mark.parametrize("kind", ["linear", "conv", "shared linear", "shared conv"])
def test_b_does_the_input_gradient_work_and_w_the_weight_gradient_work(kind: str):
    torch.manual_seed(0)
    rows, width = 4, 6
    if kind == "linear":
        model, x = linear_stack(3, width), x_(rows, width)
    elif kind == "shared linear":  # the same layer twice on one path: both uses' weight work in W
        shared = nn.Linear(width, width)
        model, x = nn.Sequential(shared, nn.Tanh(), nn.Linear(width, width), nn.Tanh(), shared).double(), x_(rows, width)
    elif kind == "conv":
        model, x = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.GELU()).double(), x_(2, 2, 7, 7)
    else:
        shared = nn.Conv2d(2, 2, 3, padding=1)
        model, x = nn.Sequential(shared, nn.ReLU(), shared, nn.Tanh()).double(), x_(2, 2, 5, 5)
    flops, ran = _assert_each_half_does_its_own_work(model, [x])
    if "linear" in kind:  # one (rows x width) @ (width x width) product per use and half
        assert flops["W"] == flops["B"] == 3 * 2 * rows * width * width, flops
    else:
        assert flops["W"] > 0 and flops["B"] > 0, flops
    assert ran["W"], "W ran no weight-side node (AccumulateGrad at least)"


# --- W once, and memory --------------------------------------------------------------------


def test_running_w_twice_raises_a_clear_error():
    model = linear_stack()
    x = x_(4, 6)
    roots = [model(x)]
    _, work = backward_input(roots, _grads_for(roots, False), [x], model.parameters())
    work.run()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="already ran"):
        work.run()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads)), "a second run added gradients"
    roots = [model(x)]
    _, work = backward_input(roots, _grads_for(roots, False), [x], model.parameters())
    work.release()
    with pytest.raises(RuntimeError, match="released"):
        work.run()


def test_backward_through_the_graph_after_w_fails_clearly():
    model = linear_stack()
    x = x_(4, 6)
    out = model(x)
    _, work = backward_input([out], _grads_for([out], False), [x], model.parameters())
    work.run()
    with pytest.raises(RuntimeError, match="released|second time"):
        out.sum().backward()


def _functional_stack(x: Tensor, weights: Sequence[nn.Linear]) -> tuple[Tensor, list[weakref.ref], list[weakref.ref]]:
    """Linear + GELU layers; weak references to pre-activations (only GELU saves them) and to layer inputs."""
    pre, post = [], []
    h = x
    for layer in weights:
        z = layer(h)
        pre.append(weakref.ref(z))
        h = F.gelu(z)
        post.append(weakref.ref(h))
    return h, pre, post


def test_b_frees_what_only_b_needs_and_w_frees_the_rest():
    layers = list(linear_stack(3))[::2]
    x = x_(4, 6)
    out, pre, post = _functional_stack(x, layers)
    _, work = backward_input([out], _grads_for([out], False), [x], [p for m in layers for p in m.parameters()])
    gc.collect()
    assert all(r() is None for r in pre), "B kept tensors only the input gradient needed (GELU inputs)"
    assert all(r() is not None for r in post[:-1]), "W needs each linear layer's input"
    kept = work.nbytes()
    elem = 8
    kept_grads = 3 * 4 * 6 * elem  # the incoming gradient of each linear layer
    kept_inputs = 3 * 4 * 6 * elem  # each linear layer's input (x and the two GELU outputs)
    assert kept == kept_grads + kept_inputs
    work.run()
    gc.collect()
    assert work.nbytes() == 0
    assert all(r() is None for r in post[:-1]), "W kept activations after it ran"


def test_plain_backward_frees_the_same_tensors():
    """The reference behaviour the memory test holds the split to (weak references do see the release)."""
    layers = list(linear_stack(3))[::2]
    x = x_(4, 6)
    out, pre, post = _functional_stack(x, layers)
    torch.autograd.backward([out], _grads_for([out], False))
    gc.collect()
    assert all(r() is None for r in pre + post[:-1])


def test_release_without_running_frees_everything():
    layers = list(linear_stack(3))[::2]
    x = x_(4, 6)
    out, pre, post = _functional_stack(x, layers)
    _, work = backward_input([out], _grads_for([out], False), [x], [p for m in layers for p in m.parameters()])
    del out
    work.release()
    work.release()  # idempotent
    gc.collect()
    assert work.nbytes() == 0 and all(r() is None for r in pre + post)
    assert all(p.grad is None for m in layers for p in m.parameters())


# --- bad input -----------------------------------------------------------------------------


def test_bad_arguments_name_the_argument_and_the_fix():
    model = linear_stack()
    x = x_(4, 6)
    out = model(x)
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"grad_roots\[0\] is None but roots\[0\] has shape \(4, 6\)"):
        backward_input([out], [None], [x], params)
    with pytest.raises(ValueError, match="grad_roots has 2 entries for 1 roots"):
        backward_input([out], [None, None], [x], params)
    with pytest.raises(ValueError, match=r"roots\[0\] does not require grad"):
        backward_input([out.detach()], [torch.ones(4, 6)], [x], params)
    with pytest.raises(TypeError, match="roots must be a sequence"):
        backward_input(out, [torch.ones(4, 6)], [x], params)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"parameters\[0\] is not a leaf"):
        backward_input([out], [torch.ones(4, 6)], [x], [params[0] * 2])
    with pytest.raises(ValueError, match=r"inputs\[0\] is also in parameters"):
        backward_input([out], [torch.ones(4, 6)], [params[0]], params)
    stage_input = x * params[1][0]  # a non-leaf input computed from a parameter
    with pytest.raises(ValueError, match=r"inputs\[0\] is not a leaf .* \(x.detach\(\).requires_grad_\(\)"):
        backward_input([model(stage_input)], [torch.ones(4, 6)], [stage_input], params)


# --- random graphs -------------------------------------------------------------------------


class RandomProgram(nn.Module):
    """A random straight-line program over activations and parameters (shared, tied, combined, unused).

    Ops: linear layers with a random (possibly re-used) weight and bias, a
    product with a weight used directly, an element-wise scale by a vector,
    weights combined before use (``w1 * w2``, ``w.t()``), activations, sums
    and products of earlier activations (skips and branches). Roots: one or
    two of the last activations, or a scalar of them.
    """

    def __init__(self, seed: int, width: int = 4) -> None:
        super().__init__()
        rng = torch.Generator().manual_seed(seed)
        pick = lambda n: int(torch.randint(n, (1,), generator=rng))
        self.mats = nn.ParameterList([nn.Parameter(torch.randn(width, width, generator=rng) / 2) for _ in range(3)])
        self.vecs = nn.ParameterList([nn.Parameter(torch.randn(width, generator=rng)) for _ in range(3)])
        self.ops = [(pick(10), pick(3), pick(3), pick(100), pick(100)) for _ in range(4 + pick(6))]
        self.roots = 1 + pick(2)
        self.scalar = pick(3) == 0

    def forward(self, *inputs: Tensor) -> list[Tensor]:
        acts = list(inputs)
        for kind, a, b, i, j in self.ops:
            h, h2 = acts[-1 - i % min(3, len(acts))], acts[j % len(acts)]
            mat, vec = self.mats[a], self.vecs[b]
            if kind == 0:
                acts.append(F.linear(h, mat, vec))
            elif kind == 1:
                acts.append(h @ mat)
            elif kind == 2:
                acts.append(h * vec)
            elif kind == 3:
                acts.append(F.linear(h, mat * self.mats[(a + 1) % 3]))
            elif kind == 4:
                acts.append(torch.tanh(h) @ mat.t() + self.vecs[b].sum())
            elif kind == 5:
                acts.append(F.gelu(h))
            elif kind == 6:
                acts.append(h + h2)
            elif kind == 7:  # a vector and a matrix used on one row, broadcast back: raw gradients of another shape
                acts.append(h + (torch.tanh(h2[:1]) @ mat + vec))
            elif kind == 8:  # a custom autograd Function (a Python node) with a weight
                acts.append(ScaledLinear.apply(h, 0.5, mat))
            else:
                acts.append(torch.tanh(h) * h2)
        roots = [a for a in acts[-self.roots:] if a.requires_grad]
        if self.scalar:
            return [sum(r.square().mean() for r in roots)]
        return roots


@pytest.mark.parametrize("seed", range(40))
def test_random_programs(seed: int):
    torch.manual_seed(seed)
    model = RandomProgram(seed).double()
    grads = seed % 4  # which inputs require grad: both, the first, the second, none
    inputs = [x_(3, 4, grad=grads in (0, 1), seed=seed), x_(3, 4, grad=grads in (0, 2), seed=seed + 100)]
    probe = model(*_clone_inputs(inputs))
    if not probe or not any(r.requires_grad for r in probe):
        pytest.skip("the program's roots reach nothing that requires grad")
    check_split(model, inputs, run=lambda m, xs: m(*xs), scalar=model.scalar)
    model.zero_grad(set_to_none=True)
    _assert_each_half_does_its_own_work(model, inputs, run=lambda m, xs: m(*xs))


def test_module_hooks_fire_in_b_and_parameter_hooks_in_w_once_each():
    model = linear_stack(2)
    calls: list[str] = []
    for index in (0, 2):
        model[index].register_full_backward_hook(lambda mod, gi, go, index=index: calls.append(f"module {index}"))
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: calls.append("accumulated"))
    x = x_(4, 6)
    roots = [model(x)]
    _, work = backward_input(roots, _grads_for(roots, False), [x], model.parameters())
    assert calls == ["module 2", "module 0"]
    calls.clear()
    work.run()
    assert calls == ["accumulated"] * 4


def test_non_reentrant_checkpoint_inside_the_stage():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    inner, outer = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)), nn.Linear(6, 6)
    model = nn.ModuleDict({"inner": inner, "outer": outer}).double()
    run: Run = lambda m, xs: [m["outer"](checkpoint(m["inner"], xs[0], use_reentrant=False))]
    check_split(model, [x_(4, 6)], run=run)


def test_tensor_hooks_and_retain_grad_on_a_layer_output_run_once():
    """W calls the layer's backward node directly: the hooks on its output tensor ran in B and do not run again."""
    lin1, lin2 = nn.Linear(6, 6).double(), nn.Linear(6, 6).double()
    x = x_(4, 6)
    seen: list[Tensor] = []
    h = lin1(x)
    h.retain_grad()
    h.register_hook(lambda g: seen.append(g.clone()))
    out = lin2(torch.tanh(h))
    _, work = backward_input([out], _grads_for([out], False), [x], [*lin1.parameters(), *lin2.parameters()])
    assert len(seen) == 1 and torch.equal(h.grad, seen[0])
    work.run()
    assert len(seen) == 1 and torch.equal(h.grad, seen[0]), "a hook on the layer output ran again in W"



def test_bias_shared_by_uses_of_different_batch_shapes():
    """Two layers' raw bias gradients, (4, 6) and (1, 6), reach one bias: each is reduced before they are summed."""

    class TwoShapes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x: Tensor) -> Tensor:
            return torch.tanh(self.lin(x))[:1] + self.lin.bias

    torch.manual_seed(0)
    check_split(TwoShapes().double(), [x_(4, 6)])


class ScaledLinear(torch.autograd.Function):
    """A custom autograd Function with a weight (and a non-tensor argument): its node is a Python one."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.scale = scale
        return scale * x @ weight.t()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = ctx.scale * grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = ctx.scale * grad.t() @ x if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_w


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
def test_custom_autograd_function_layer(shared: bool, hooked: bool):
    """A custom Function as a layer; shared: its weight is also used by a linear layer below it on the input path;
    hooked: a hook doubling its output's gradient, which must apply once to its weight gradient too."""

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.weight = nn.Linear(6, 6), nn.Parameter(torch.randn(6, 6))

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(F.linear(x, self.weight) if shared else self.lin(x))
            out = ScaledLinear.apply(h, 2.0, self.weight)
            if hooked and out.requires_grad:
                out.register_hook(lambda g: 2 * g)
            return self.lin(out)

    torch.manual_seed(0)
    check_split(Custom().double(), [x_(4, 6)])
    check_split(Custom().double(), [x_(4, 6, grad=False)])
    _assert_each_half_does_its_own_work(Custom().double(), [x_(4, 6)])
