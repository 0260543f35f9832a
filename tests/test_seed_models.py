"""The seed tables' models and data: MobileNetV2 layer for layer, the AmoebaNet-D stand-in's cells, the digits.

MobileNetV2 is checked against a hand-written spec of torchvision's
architecture (its inverted-residual table and its published parameter
count, 3,504,872 at width 1.0 and 1,000 classes) and, where torchvision's
sources can be imported beside the CPU torch, against torchvision's own
module: same layers, same shapes, and in float64 the same output on the
same weights. The pipelined MobileNetV2 gives the un-pipelined gradients.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu.models import Cell, amoebanet_d, parameter_count  # noqa: E402
from benchmarks.mobilenet import InvertedResidual, make_divisible, mobilenet_v2  # noqa: E402

#: torchvision's MobileNetV2 features, written out: (input channels, output channels, stride, expansion)
TORCHVISION_BLOCKS = [
    (32, 16, 1, 1),
    (16, 24, 2, 6), (24, 24, 1, 6),
    (24, 32, 2, 6), (32, 32, 1, 6), (32, 32, 1, 6),
    (32, 64, 2, 6), (64, 64, 1, 6), (64, 64, 1, 6), (64, 64, 1, 6),
    (64, 96, 1, 6), (96, 96, 1, 6), (96, 96, 1, 6),
    (96, 160, 2, 6), (160, 160, 1, 6), (160, 160, 1, 6),
    (160, 320, 1, 6),
]


def _convs(block: nn.Module) -> list[tuple[int, int, int, int, int]]:
    return [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.groups)
            for c in block.modules() if isinstance(c, nn.Conv2d)]


def test_mobilenet_v2_matches_torchvisions_architecture_layer_for_layer():
    model = mobilenet_v2()
    assert len(model) == 1 + len(TORCHVISION_BLOCKS) + 5
    assert _convs(model[0]) == [(3, 32, 3, 2, 1)]
    for layer, (inp, out, stride, t) in zip(model[1:18], TORCHVISION_BLOCKS):
        assert isinstance(layer, InvertedResidual)
        hidden = inp * t
        expand = [] if t == 1 else [(inp, hidden, 1, 1, 1)]
        assert _convs(layer) == expand + [(hidden, hidden, 3, stride, hidden), (hidden, out, 1, 1, 1)]
        assert layer.use_res_connect == (stride == 1 and inp == out)
    assert _convs(model[18]) == [(320, 1280, 1, 1, 1)]
    assert [type(m) for m in model[19:]] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Linear]
    assert parameter_count(model) == 3_504_872  # torchvision's published figure for mobilenet_v2


def test_mobilenet_v2_width_multiplier_rounds_channels_as_torchvision():
    assert [make_divisible(32 * w) for w in (0.25, 0.5, 0.75, 1.4)] == [8, 16, 24, 48]
    assert make_divisible(1280 * 1.4) == 1792
    half = mobilenet_v2(num_classes=10, width_mult=0.5)
    assert _convs(half[0]) == [(3, 16, 3, 2, 1)] and half[-1].in_features == 1280
    with pytest.raises(ValueError, match="width_mult"):
        mobilenet_v2(width_mult=0)


def _torchvision_mobilenetv2():
    """torchvision's mobilenetv2 module from its sources, without its compiled ops (a CPU torch may lack them)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchvision is not installed (pip install --no-deps torchvision matching torch)")
    root = spec.submodule_search_locations[0]
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    try:
        for name, sub in (("torchvision", ""), ("torchvision.ops", "/ops"), ("torchvision.models", "/models")):
            package = types.ModuleType(name)
            package.__path__ = [root + sub]
            sys.modules[name] = package
        return importlib.import_module("torchvision.models.mobilenetv2")
    except Exception as error:  # noqa: BLE001 - an incompatible torchvision is a skip, not a failure
        pytest.skip(f"torchvision's mobilenetv2 does not import here: {error}")
    finally:
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("width", [1.0, 0.5])
def test_mobilenet_v2_equals_torchvisions_module_on_the_same_weights(width):
    reference = _torchvision_mobilenetv2().MobileNetV2(num_classes=10, width_mult=width).double().eval()
    ours = mobilenet_v2(num_classes=10, width_mult=width).double().eval()
    theirs = list(reference.features) + [reference.classifier[1]]
    mine = list(ours[:19]) + [ours[-1]]
    assert len(theirs) == len(mine)
    for a, b in zip(theirs, mine):  # layer for layer: the same parameter and buffer shapes, in order
        assert [t.shape for t in a.state_dict().values()] == [t.shape for t in b.state_dict().values()]
    values = list(reference.state_dict().values())
    ours.load_state_dict(dict(zip(ours.state_dict().keys(), values, strict=True)))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-12, atol=1e-12)


def test_pipelined_mobilenet_v2_gives_the_unpipelined_gradients():
    """Batch norm normalises per micro-batch, so the reference runs each micro-batch and weights its loss."""
    from pipesched import Pipeline

    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10, width_mult=0.25, dropout=0.0).double()
    reference = mobilenet_v2(num_classes=10, width_mult=0.25, dropout=0.0).double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    with Pipeline(model, schedule="1f1b", balance=[11, 12], devices=["cpu", "cpu"], chunks=4, checkpoint="never",
                  loss_fn=nn.CrossEntropyLoss(), log_tasks=False) as pipe:
        pipe.step(x, y)
    for xm, ym in zip(x.chunk(4), y.chunk(4)):
        (nn.functional.cross_entropy(reference(xm), ym) * len(ym) / len(y)).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


def _cell_params(inp: int, c: int) -> int:
    """Preprocess 1x1 + BN, separable 3x3 (depthwise, pointwise, BN), 1x7 and 7x1 + BN; pools have none."""
    return (inp * c + 2 * c) + (9 * c + c * c + 2 * c) + (2 * 7 * c * c + 2 * c)


@pytest.mark.parametrize("L, D", [(3, 8), (6, 16), (7, 12), (18, 32)])
def test_amoebanet_stand_in_has_the_seed_tables_knobs_and_a_closed_form_parameter_count(L, D):
    model = amoebanet_d(L, D, num_classes=10)
    per_stack = math.ceil(L / 3)
    cells = [m for m in model if isinstance(m, Cell)]
    assert len(model) == 3 * per_stack + 8 and len(cells) == 3 * per_stack + 2
    expected = 3 * 9 * (D // 2) + 2 * (D // 2) + (D // 2) * 9 * D + 2 * D  # stem: two 3x3 convs with BN
    inp = D
    for stack in range(3):
        c = D * 2**stack
        for _ in range(per_stack + (1 if stack else 0)):  # a reduction cell opens stacks 1 and 2
            expected += _cell_params(inp, c)
            inp = 4 * c
    expected += inp * 10 + 10
    assert parameter_count(model) == expected
    strides = [m.sep3[1].stride[0] for m in cells]
    assert strides == [1] * per_stack + [2] + [1] * per_stack + [2] + [1] * per_stack
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_digits_split_is_fixed_stratified_and_upsampled():
    from benchmarks.digits import epoch_batches, load

    a, b = load(16), load(16)
    assert a.x_train.shape == (1437, 3, 16, 16) and a.x_test.shape == (360, 3, 16, 16)
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_test, b.x_test)
    assert torch.bincount(a.y_test).min() >= 35  # stratified: every digit about 36 times in the test split
    assert abs(float(a.x_train.mean())) < 0.05  # normalised with the training split's statistics
    batches = epoch_batches(1437, 64, seed=3, epoch=1)
    assert len(batches) == 22 and all(len(i) == 64 for i in batches)
    assert len(torch.cat(batches).unique()) == 22 * 64
    assert all(torch.equal(p, q) for p, q in zip(batches, epoch_batches(1437, 64, seed=3, epoch=1)))
    assert not torch.equal(batches[0], epoch_batches(1437, 64, seed=3, epoch=2)[0])


def test_seed_memory_ladder_never_shrinks_a_model():
    """The bisection is valid only if a later rung needs at least as much memory: L and D never decrease."""
    from benchmarks.bench_seed_memory import ladder

    for level in ("tiny", "full"):
        rungs = ladder(level)
        assert all(L1 <= L2 and D1 <= D2 for (L1, D1), (L2, D2) in zip(rungs, rungs[1:])), rungs
        assert len(set(rungs)) == len(rungs)
