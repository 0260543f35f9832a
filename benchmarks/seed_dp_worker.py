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

Any exception is replied as ``("error", rank, traceback)``.
"""

from __future__ import annotations

import datetime
import traceback
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.digits import load
from benchmarks.seed_training import Recipe, build, train


def serve(rank: int, world: int, port: int, spec: dict[str, Any], commands: Any, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        recipe = Recipe(**spec["recipe"])
        data = load(recipe.size)
        results.put(("ready", rank, {"threads": torch.get_num_threads()}))
        while True:
            command, argument = commands.get()
            if command == "stop":
                break
            if command != "train":
                raise ValueError(f"unknown command {command!r}")
            model = build(recipe, int(argument))
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            criterion = torch.nn.CrossEntropyLoss()

            def step(x: torch.Tensor, y: torch.Tensor) -> None:
                criterion(ddp(x), y).backward()

            dist.barrier()  # every process starts together; the parent keeps the slowest one's seconds
            out = train(model, step, recipe, data, int(argument), shard=lambda idx: idx.tensor_split(world)[rank])
            results.put(("ok", rank, out))
    except BaseException:  # noqa: BLE001 - the benchmark process reports it
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
