"""The GPU check's models, written here so they also build in the CPU dry run.

torchvision cannot be installed beside the CPU torch the project develops on,
so ResNet-101 is our own ``nn.Sequential`` (one layer per stem module and per
bottleneck block, as a pipeline cuts it). It mirrors torchvision's module
order and names inside each block, so on a machine that has torchvision its
state dict loads into ours by position and :func:`cross_check_resnet101`
compares parameter count and output.

The AmoebaNet-D (L, D) stand-in keeps the two scaling knobs of the seed table:
L normal cells (L/3 per stack, three stacks, a reduction cell between stacks)
and D filters (doubling at each reduction). Its cells are simplified
(one input instead of two, four branches), so its parameter count differs
from AmoebaNet-D's at the same (L, D): tables report both knobs and the count.

The GPT-like model is what the orchestration check runs under bf16 autocast:
embedding, pre-norm transformer blocks with causal SDPA, a head whose logits
are ``(N, vocab, T)`` so ``nn.CrossEntropyLoss`` takes ``(N, T)`` targets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.gpt import Block, Embedding, Head

# ---------------------------------------------------------------- ResNet-101


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: stride on the 3x3 conv, same child names and order."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def resnet101(num_classes: int = 1000, width: int = 64, blocks: tuple[int, ...] = (3, 4, 23, 3)) -> nn.Sequential:
    """ResNet-101 (``blocks=(3, 4, 23, 3)``, ``width=64``) as a flat ``nn.Sequential`` of 40 layers.

    Smaller ``width``/``blocks`` give the same structure at dry-run size. The
    stem's ReLU is not in place: a stage may start with it, and a stage input
    is a leaf that requires grad.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    inplanes = width
    for index, count in enumerate(blocks):
        planes = width * 2**index
        stride = 1 if index == 0 else 2
        for block in range(count):
            downsample = None
            if block == 0 and (stride != 1 or inplanes != planes * Bottleneck.expansion):
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * Bottleneck.expansion),
                )
            layers.append(Bottleneck(inplanes, planes, stride if block == 0 else 1, downsample))
            inplanes = planes * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    model = nn.Sequential(*layers)
    for module in model.modules():  # torchvision's initialisation
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cross_check_resnet101(device: torch.device) -> dict[str, Any]:
    """Our ResNet-101 against torchvision's: parameter count, and output with torchvision's weights.

    Returns ``{"status": "skipped", ...}`` when torchvision is not importable
    (the dry run here); otherwise ``status`` is ``"ok"`` or ``"mismatch"``.
    """
    try:
        import torchvision
        from torchvision.models import resnet101 as torchvision_resnet101
    except Exception as error:  # noqa: BLE001 - ImportError, or a torchvision built for another torch
        return {"status": "skipped", "reason": f"torchvision not importable ({type(error).__name__}: {error})"}
    reference = torchvision_resnet101(weights=None).to(device).eval()
    ours = resnet101().to(device).eval()
    theirs_state, ours_state = reference.state_dict(), ours.state_dict()
    if len(theirs_state) != len(ours_state):
        return {"status": "mismatch", "reason": f"{len(theirs_state)} state entries vs our {len(ours_state)}"}
    mapped = {}
    for (their_key, value), (our_key, ours_value) in zip(theirs_state.items(), ours_state.items()):
        if value.shape != ours_value.shape:
            return {"status": "mismatch", "reason": f"{their_key} {tuple(value.shape)} vs {our_key} "
                                                    f"{tuple(ours_value.shape)}"}
        mapped[our_key] = value
    ours.load_state_dict(mapped)
    x = torch.randn(2, 3, 224, 224, device=device)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            want = reference(x)
            diff = (ours(x) - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    counts = (parameter_count(ours), parameter_count(reference))
    ok = counts[0] == counts[1] and diff <= 1e-5  # same kernels on the same weights: equal up to rounding
    return {"status": "ok" if ok else "mismatch", "torchvision": torchvision.__version__,
            "params_ours": counts[0], "params_torchvision": counts[1], "max_output_diff_relative": diff}


# ---------------------------------------------------------- AmoebaNet-D (L, D)


class SepConv(nn.Sequential):
    """ReLU, depthwise k x k, pointwise 1 x 1, batch norm (AmoebaNet's separable conv, once)."""

    def __init__(self, channels: int, kernel: int, stride: int):
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel, stride=stride, padding=kernel // 2, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )


class Conv17x71(nn.Sequential):
    """ReLU, 1 x 7 then 7 x 1 convolutions, batch norm (AmoebaNet's factorised 7 x 7)."""

    def __init__(self, channels: int, stride: int):
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(channels, channels, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
            nn.Conv2d(channels, channels, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
            nn.BatchNorm2d(channels),
        )


class Cell(nn.Module):
    """One AmoebaNet-style cell: 1 x 1 preprocessing to ``channels``, four branches, concatenated.

    A reduction cell (``stride=2``) halves height and width. Output channels:
    ``4 * channels``.
    """

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.preprocess = nn.Sequential(nn.ReLU(), nn.Conv2d(in_channels, channels, 1, bias=False),
                                        nn.BatchNorm2d(channels))
        self.sep3 = SepConv(channels, 3, stride)
        self.conv7 = Conv17x71(channels, stride)
        self.avg = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        self.max = nn.MaxPool2d(3, stride=stride, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.preprocess(x)
        return torch.cat([self.sep3(h), self.conv7(h), self.avg(h), self.max(h)], dim=1)


def amoebanet_d(num_layers: int, num_filters: int, num_classes: int = 1000) -> nn.Sequential:
    """The AmoebaNet-D (L, D) stand-in: stem, 3 stacks of L/3 normal cells, 2 reduction cells, head.

    ``num_layers`` is L (rounded up to a multiple of 3), ``num_filters`` D;
    stack k works on ``D * 2**k`` channels. Each cell is one layer of the
    returned ``nn.Sequential``.
    """
    if num_layers < 1 or num_filters < 1:
        raise ValueError(f"AmoebaNet-D needs L >= 1 and D >= 1, got ({num_layers}, {num_filters})")
    per_stack = -(-num_layers // 3)
    stem = num_filters // 2 or 1
    layers: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(stem)),
        nn.Sequential(nn.ReLU(), nn.Conv2d(stem, num_filters, 3, stride=2, padding=1, bias=False),
                      nn.BatchNorm2d(num_filters)),
    ]
    in_channels = num_filters
    for stack in range(3):
        channels = num_filters * 2**stack
        if stack:
            layers.append(Cell(in_channels, channels, stride=2))
            in_channels = 4 * channels
        for _ in range(per_stack):
            layers.append(Cell(in_channels, channels, stride=1))
            in_channels = 4 * channels
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ GPT-like


# the layers are benchmark 11's (benchmarks/gpt.py): one GPT for the CPU and the GPU figures


def gpt(vocab: int, width: int, heads: int, blocks: int, seq_len: int) -> nn.Sequential:
    """``[Embedding, Block x blocks, Head]``: ``blocks + 2`` layers."""
    if width % heads:
        raise ValueError(f"width {width} must be a multiple of heads {heads}")
    return nn.Sequential(Embedding(vocab, width, seq_len), *[Block(width, heads) for _ in range(blocks)],
                         Head(width, vocab))
