"""``torch.distributed.pipelining`` on a Hugging Face model, as a user of it writes it (one gloo peer's side).

Each process builds the model from the seed, traces it with ``pipeline()``
(one micro-batch's shape, split at the workload's split point,
``SplitPoint.BEGINNING``), builds its own stage and runs ``Schedule1F1B``
with the same shifted causal LM loss as pipesched's, gradients scaled by
1/m (``scale_grads=True``). ``build_seconds`` is what ``pipeline()`` plus
``build_stage`` cost this process.

Gradients are keyed ``"<rank>:<name>"``: torch's tracer copies GPT-2's tied
embedding/head into each stage that uses it (``transformer.wte.weight`` on
stage 0, ``lm_head.weight`` on stage 1 and, unused, on stage 0), so one name
can hold a different gradient on each rank.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.hf_workload import HFWorkload
from pipesched import CausalLMLoss


def lm_loss(output: Any, labels: Tensor) -> Tensor:
    """The shifted, token-mean cross-entropy of the last stage's output (logits, or a tuple holding them)."""
    logits = output[0] if isinstance(output, (tuple, list)) else output
    return CausalLMLoss()(logits, labels)


class TorchPipeliningHF:
    def __init__(self, workload: HFWorkload, rank: int, world: int):
        from torch.distributed.pipelining import Schedule1F1B, SplitPoint, pipeline

        if world != 2:
            raise ValueError(f"the HF pipelining peer runs 2 stages on 2 processes, got world {world}")
        start = time.perf_counter()
        model = workload.model()
        traced = pipeline(model, mb_args=(), mb_kwargs=workload.microbatch(),
                          split_spec={workload.split_points[0]: SplitPoint.BEGINNING})
        stage = traced.build_stage(rank, torch.device("cpu"))
        self.build_seconds = time.perf_counter() - start
        self.model: nn.Module = stage.submod
        self.rank, self.world = rank, world
        self.schedule = Schedule1F1B(stage, n_microbatches=workload.chunks, loss_fn=lm_loss, scale_grads=True)
        self.inputs, self.labels = workload.data()

    def step(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        if self.rank == 0:
            self.schedule.step(**self.inputs)
        else:
            losses: list[Tensor] = []
            self.schedule.step(target=self.labels, losses=losses)

    def grads(self) -> dict[str, Any]:
        return {f"{self.rank}:{name}": p.grad.detach().numpy().copy()
                for name, p in self.model.named_parameters() if p.grad is not None}
