"""scikit-learn's handwritten digits as a small image-classification task (no download).

``load_digits`` ships 1,797 grey 8 x 8 images of the digits 0-9 inside the
package. For MobileNetV2 they are scaled to [0, 1], normalised with the
training set's mean and standard deviation, upsampled bilinearly to
``size`` x ``size`` and repeated on 3 channels (so the network keeps
torchvision's RGB stem). The train/test split is fixed (stratified, 20 %
test, ``random_state=0``), whatever the training seed.

:func:`epoch_batches` gives the same shuffled order of global batches to
every contender for a given seed and epoch (incomplete last batch dropped),
so a pipeline and data-parallel processes see the same samples per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load(size: int = 32, test_fraction: float = 0.2) -> Digits:
    """The fixed split, as float32 ``(N, 3, size, size)`` images and int64 labels."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # pragma: no cover - the test extra installs it
        raise RuntimeError("the seed tables train on scikit-learn's load_digits: pip install scikit-learn") from error
    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8 x 8), got {size}")
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.images, data.target, test_size=test_fraction,
                                              random_state=0, stratify=data.target)
    x_train = torch.tensor(x_tr, dtype=torch.float32) / 16.0
    x_test = torch.tensor(x_te, dtype=torch.float32) / 16.0
    mean, std = x_train.mean(), x_train.std()

    def images(x: Tensor) -> Tensor:
        x = ((x - mean) / std).unsqueeze(1)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.expand(-1, 3, -1, -1).contiguous()

    return Digits(images(x_train), torch.tensor(y_tr, dtype=torch.int64), images(x_test),
                  torch.tensor(y_te, dtype=torch.int64))


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[Tensor]:
    """Index tensors of the ``n // batch`` global batches of one epoch, shuffled by (seed, epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return [order[i * batch:(i + 1) * batch] for i in range(n // batch)]
