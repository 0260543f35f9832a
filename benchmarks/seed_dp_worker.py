"""What each ``DistributedDataParallel`` process of the seed's table 1 runs (see :mod:`benchmarks.bench_seed_dp`).

The process joins a gloo group on 127.0.0.1 with one intra-op thread, loads
the digits, says it is ready, then serves commands until ``stop``:

* ``("train", seed)``: build MobileNetV2 from ``seed`` (every process the
  same weights), wrap it in ``DistributedDataParallel`` and train the
  recipe, each process on its share of every global batch (gradients
  all-reduced, so every step is the global batch's mean loss); replies the
  seconds of the training loop (after a barrier, so all start together),
  and the test accuracy (the weights are equal; batch norm's running
  statistics are rank 0's, broadcast at each forward, plus each process's
  own last update, so the parent reports rank 0's).

The loop itself is :func:`benchmarks.peer_loop.serve_commands`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from benchmarks.digits import load
from benchmarks.peer_loop import serve_commands
from benchmarks.seed_training import Recipe, build, train


def serve(rank: int, world: int, port: int, spec: dict[str, Any], commands: Any, results: Any) -> None:
    state: dict[str, Any] = {}

    def setup() -> None:  # inside the loop's error handling: a bad spec is replied, not a silent death
        state["recipe"] = recipe = Recipe(**spec["recipe"])
        state["digits"] = load(recipe.size)

    def train_seed(seed: Any) -> dict[str, float]:
        recipe: Recipe = state["recipe"]
        model = build(recipe, int(seed))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        criterion = torch.nn.CrossEntropyLoss()

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            criterion(ddp(x), y).backward()

        dist.barrier()  # every process starts together; the parent keeps the slowest one's seconds
        return train(model, step, recipe, state["digits"], int(seed), shard=lambda idx: idx.tensor_split(world)[rank])

    serve_commands(rank, world, port, commands, results, {"train": train_seed}, setup)
