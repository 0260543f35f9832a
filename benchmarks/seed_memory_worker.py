"""What each rank process of the seed's table 2 runs (see :mod:`benchmarks.bench_seed_memory`).

One process per pipeline rank, so that a rank's real memory is a process's
heap (:func:`benchmarks.heap.heap_in_use`: glibc's bytes in use, where
torch's CPU allocator takes every tensor from): no other rank's tensors are
in it. The process joins a gloo group of ``world`` processes, then serves
commands until ``stop``:

* ``("measure", trial)``: build this rank's stages of AmoebaNet-D
  ``(trial["L"], trial["D"])`` (on the meta device first, then only the own
  stages are given memory and initialised, so no rank ever holds the whole
  model), wrap them in a :class:`~pipesched.distributed.DistributedPipeline`
  (or, for ``schedule=None``, keep the plain model on rank 0 alone: the
  un-pipelined baseline; the other ranks reply zeros), run one warm-up training step with SGD, then a measured one;
  reply the peak heap during the measured step (forward, backward,
  ``optimizer.step()``) above the heap before the model was built:
  parameters, gradients, activations, transfers and temporaries of this
  rank, the same bytes a per-device memory budget covers.

The loop itself is :func:`benchmarks.peer_loop.serve_commands`.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from benchmarks.gpu.models import amoebanet_d
from benchmarks.heap import HeapPeak, heap_in_use
from benchmarks.peer_loop import serve_commands
from pipesched.plan.registry import get_schedule
from pipesched.runtime.partition import even_balance


def materialise(module: nn.Module, seed: int) -> nn.Module:
    """Give a meta-device module real (CPU) memory and initialise it as its layers' constructors would."""
    torch.manual_seed(seed)
    module.to_empty(device="cpu")
    for sub in module.modules():
        if hasattr(sub, "reset_parameters") and sub is not module:
            sub.reset_parameters()
    return module


def own_stages(trial: dict[str, Any], rank: int, world: int) -> tuple[dict[int, nn.Module], int]:
    """This rank's stages (even balance over the layers, the schedule's placement) and the stage count."""
    with torch.device("meta"):
        model = amoebanet_d(trial["L"], trial["D"], num_classes=trial["classes"])
    layers = list(model)
    balance = even_balance(len(layers), world)
    placement = get_schedule(trial["schedule"]).placement(world, world)
    starts = [sum(balance[:s]) for s in range(world)]
    stages = {s: materialise(nn.Sequential(*layers[starts[s]:starts[s] + balance[s]]), s)
              for s in range(world) if placement[s] == rank}
    return stages, world


def measure(trial: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(trial["batch"], 3, trial["image"], trial["image"], generator=g)
    y = torch.randint(0, trial["classes"], (trial["batch"],), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    gc.collect()
    base = heap_in_use()
    if trial["schedule"] is None:
        if rank != 0:  # the un-pipelined baseline is one process: rank 0; the others have nothing to hold
            return {"peak_bytes": 0, "param_bytes": 0, "params": 0}
        with torch.device("meta"):
            model = amoebanet_d(trial["L"], trial["D"], num_classes=trial["classes"])
        materialise(model, 0)
        step, parameters, closer = (lambda: loss_fn(model(x), y).backward()), list(model.parameters()), None
    else:
        from pipesched.distributed import DistributedPipeline

        stages, num_stages = own_stages(trial, rank, world)
        schedule = (get_schedule("auto", memory_limit=trial["auto_cap"]) if trial["schedule"] == "auto"
                    else trial["schedule"])
        pipe = DistributedPipeline(stages, num_stages=num_stages, schedule=schedule, chunks=trial["chunks"],
                                   checkpoint=trial["checkpoint"], loss_fn=loss_fn, log_tasks=False)
        step, parameters, closer = (lambda: pipe.step(x, y)), list(pipe.parameters()), pipe
    # a rank may hold only parameter-free layers (pooling, flatten): then there is nothing to update
    optimizer = torch.optim.SGD(parameters, lr=0.01) if parameters else None
    try:
        for warm_up in (True, False):  # the first step allocates gradients (and lets "auto" measure costs)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=False)
            gc.collect()
            gc.disable()  # no collection inside the measured step: it would lower the heap under the meter
            try:
                with HeapPeak() as meter:
                    step()
                    if optimizer is not None:
                        optimizer.step()
            finally:
                gc.enable()
        params = sum(p.numel() for p in parameters)
        return {"peak_bytes": meter.peak - base, "param_bytes": 4 * params, "params": params}
    finally:
        if closer is not None:
            closer.close()


def serve(rank: int, world: int, port: int, spec: dict[str, Any], commands: Any, results: Any) -> None:
    def measure_and_collect(trial: Any) -> dict[str, Any]:
        out = measure(trial, rank, world)
        gc.collect()
        return out

    serve_commands(rank, world, port, commands, results, {"measure": measure_and_collect})
