"""MobileNetV2 as a flat ``nn.Sequential``, the model of the seed's pipeline-vs-data-parallel table.

torchgpipe's accuracy table trains MobileNetV2; a pipeline cuts an
``nn.Sequential`` by ``balance``, so here every entry of torchvision's
``features`` is one layer (the stem conv, each inverted-residual block, the
last 1 x 1 conv), followed by the pooling, flattening and classifier that
torchvision's ``forward`` applies. Inside each layer the child modules have
torchvision's order and shapes (``conv``: expand 1 x 1, depthwise 3 x 3,
project 1 x 1, each conv followed by its batch norm; ReLU6 after the first
two), so a torchvision state dict loads into ours by position and
``tests/test_seed_models.py`` compares the two layer for layer where
torchvision's sources are importable.

``SETTINGS`` is torchvision's inverted-residual table ``(t, c, n, s)``:
expansion, output channels, repeats, stride of the first repeat.
"""

from __future__ import annotations

from torch import Tensor, nn

#: torchvision's ``inverted_residual_setting`` for MobileNetV2: (expand ratio t, channels c, repeats n, stride s).
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM, LAST = 32, 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10 % down (the MobileNet papers' rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias), batch norm, ReLU6: torchvision's ``Conv2dNormActivation`` with its defaults."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1 x 1, skipped when t = 1), depthwise 3 x 3 with the stride, linear 1 x 1 projection.

    The residual connection is taken when the block keeps its shape
    (stride 1 and as many channels out as in), as in the paper.
    """

    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(inp, hidden, kernel=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> nn.Sequential:
    """MobileNetV2 as ``[stem, 17 inverted residuals, last conv, pool, flatten, dropout, linear]`` (23 layers).

    ``width_mult`` scales every channel count as torchvision does (rounded to
    multiples of 8; the last conv keeps 1280 below 1.0). The ReLU6 of the stem
    is in place, as torchvision's; a stage that starts with a block never
    starts with an in-place op on its input.
    """
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    channels = make_divisible(STEM * width_mult)
    last = make_divisible(LAST * max(1.0, width_mult))
    layers: list[nn.Module] = [conv_bn_relu6(3, channels, stride=2)]
    for t, c, n, s in SETTINGS:
        out = make_divisible(c * width_mult)
        for i in range(n):
            layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
            channels = out
    layers += [
        conv_bn_relu6(channels, last, kernel=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Dropout(dropout),
        nn.Linear(last, num_classes),
    ]
    model = nn.Sequential(*layers)
    _init_like_torchvision(model)
    return model


def _init_like_torchvision(model: nn.Module) -> None:
    """torchvision's initialisation: Kaiming fan-out convs, unit batch norms, N(0, 0.01) classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
