"""``CausalLMLoss``: next-token cross-entropy on unshifted labels, as Hugging Face's ``labels=`` computes it.

Why pipesched ships it: a model's own ``labels=`` loss cannot be used per
micro-batch (each would be a mean over its own tokens), and transformers'
``ForCausalLMLoss`` upcasts logits to float32, which in a float64 model is a
*down*cast. This loss takes the model's output and the labels as a batch
holds them, shifts them (position ``t`` predicts label ``t + 1``), and
declares its normaliser (the tokens it keeps), so every micro-batch is
weighted by its share of the batch's tokens with no ``loss_normalizer=``:
the pipelined loss and gradients are those of the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F


class CausalLMLoss(nn.Module):
    """Mean cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]``, over labels other than ``ignore_index``.

    ``output``: logits ``(B, T, V)`` or a mapping (a ``ModelOutput``) holding
    ``"logits"``. ``labels``: ``(B, T)`` class indices, unshifted. Computes
    in the logits' dtype.
    """

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index

    def forward(self, output: Any, labels: Tensor) -> Tensor:
        logits = _logits(output)
        if labels.dim() != 2 or logits.dim() != 3 or logits.shape[:2] != labels.shape:
            raise ValueError(
                f"CausalLMLoss needs logits (B, T, V) and labels (B, T), got logits {tuple(logits.shape)} and "
                f"labels {tuple(labels.shape)}; pass the unshifted labels, one per input token"
            )
        shifted = labels[:, 1:].to(logits.device)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=self.ignore_index)

    def loss_normalizer(self, labels: Tensor) -> Tensor:
        """What this loss's mean divides by for ``labels``: the shifted labels it keeps."""
        return (labels[:, 1:] != self.ignore_index).sum()

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    raise TypeError(
        f"CausalLMLoss takes logits (a Tensor) or a mapping with 'logits' (a ModelOutput), got "
        f"{type(output).__name__}"
        + (f" with keys {list(output)}" if isinstance(output, Mapping) else "")
    )
