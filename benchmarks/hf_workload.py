"""A Hugging Face GPT-2 built from a small config: the model both sides of benchmark 16 pipeline.

Random init from a seed (the same weights in every process), float32,
``use_cache=False`` (``torch.distributed.pipelining``'s tracer cannot carry
a ``DynamicCache``), dropout off (the two pipelines draw their masks
differently, so gradients could not be compared). The batch has one fixed
shape and no padding: torch's ``pipeline()`` fixes every shape when it
traces, and its per-micro-batch mean loss equals the batch's token mean only
when every micro-batch counts the same tokens. GPT-2 ties its embedding and
head, which is the case the gradient check is about.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class HFWorkload:
    layers: int
    width: int
    heads: int
    vocab: int
    batch: int
    tokens: int
    chunks: int = 4
    seed: int = 0

    @property
    def split_points(self) -> list[str]:
        """Two stages: the first half of the blocks (with the embeddings) | the rest (with the head)."""
        return [f"transformer.h.{self.layers // 2}"]

    def model(self) -> nn.Module:
        import transformers  # noqa: PLC0415 - an optional dependency, needed only by this benchmark

        config = transformers.GPT2Config(
            n_layer=self.layers, n_embd=self.width, n_head=self.heads, vocab_size=self.vocab,
            n_positions=max(64, self.tokens), use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0,
        )
        torch.manual_seed(self.seed)
        model = transformers.GPT2LMHeadModel(config).float()
        model.train()
        return model

    def data(self) -> tuple[dict[str, Tensor], Tensor]:
        """``({"input_ids", "attention_mask"}, labels)``: unpadded rows; labels are the ids (HF's ``labels=``)."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        ids = torch.randint(0, self.vocab, (self.batch, self.tokens), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone()

    def microbatch(self) -> dict[str, Tensor]:
        """One micro-batch's inputs: what torch's ``pipeline()`` traces with (it fixes this shape)."""
        inputs, _ = self.data()
        return {k: v[: self.batch // self.chunks] for k, v in inputs.items()}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
