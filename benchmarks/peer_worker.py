"""What runs inside each gloo peer process (see :mod:`benchmarks.gloo_peers`).

The process joins a 2-process gloo group on 127.0.0.1, builds the workload's
model from its seed, wraps it as the peer asks, says it is ready, then serves
commands from its queue until ``stop``:

* ``("run", k)``: barrier, ``k`` training steps, barrier; replies the seconds
  between the barriers (so every rank's figure covers the whole group's k steps)
  and the CPU seconds this process used for its k steps;
* ``("grads", None)``: one step from zero gradients; replies this rank's
  parameter gradients by their names in the full model, as numpy arrays.

Modes: ``"pipesched"`` (this rank of a :class:`pipesched.distributed.DistributedPipeline`
over the same model: pipesched's multi-process runtime), ``"pipelining"``
(``torch.distributed.pipelining``: this rank's stage
of the model under ``Schedule1F1B`` or ``ScheduleGPipe``, loss on the last
stage, gradients scaled by 1/m so they equal the whole batch's mean loss),
``"ddp"`` (``DistributedDataParallel`` over the full model, each rank on its
share of the batch) and ``"hf-pipelining"`` (:mod:`benchmarks.hf_peer`: a Hugging Face
model traced by torch's ``pipeline()``, whose gradients are keyed by rank and name). ``spec["sys_path"]``, when given, goes first on ``sys.path``
(so ``"pipesched"`` mode can run another version of the package for an A/B). Any exception is replied as ``("error", rank, traceback)``.
"""

from __future__ import annotations

import datetime
import sys
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.workloads import Workload, loss_fn, zero_grad


class _Pipelining:
    def __init__(self, workload: Workload, schedule: str, balance: list[int], rank: int, world: int):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
        )

        if len(balance) != world:
            raise ValueError(f"balance {balance} must have one entry per process ({world})")
        self.model = workload.model()
        first = sum(balance[:rank])
        self.stage_module = nn.Sequential(*list(self.model)[first:first + balance[rank]])
        self.rank, self.world = rank, world
        stage = PipelineStage(self.stage_module, rank, world, torch.device("cpu"))
        kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[schedule]
        self.schedule = kind(stage, n_microbatches=workload.chunks, loss_fn=loss_fn(), scale_grads=True)
        self.x, self.y = workload.data()

    def step(self) -> None:
        zero_grad(self.stage_module)
        if self.rank == 0:
            self.schedule.step(self.x)
        elif self.rank == self.world - 1:
            losses: list[torch.Tensor] = []
            self.schedule.step(target=self.y, losses=losses)
        else:
            self.schedule.step()


class _Pipesched:
    """pipesched's multi-process runtime: this rank of a DistributedPipeline over the same model."""

    def __init__(self, workload: Workload, schedule: str, balance: list[int]):
        from pipesched.distributed import DistributedPipeline

        self.model = workload.model()
        self.pipe = DistributedPipeline(self.model, schedule=schedule, balance=balance, chunks=workload.chunks,
                                        checkpoint="never", loss_fn=loss_fn())
        self.x, self.y = workload.data()

    def step(self) -> None:
        zero_grad(self.pipe)
        self.pipe.step(self.x, self.y)


class _DataParallel:
    def __init__(self, workload: Workload, rank: int, world: int):
        from torch.nn.parallel import DistributedDataParallel

        self.model = workload.model()
        self.ddp = DistributedDataParallel(self.model)
        x, y = workload.data()
        self.x, self.y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        self.criterion = loss_fn()

    def step(self) -> None:
        zero_grad(self.model)
        self.criterion(self.ddp(self.x), self.y).backward()


def serve(rank: int, world: int, port: int, spec: dict[str, Any], commands: Any, results: Any) -> None:
    try:
        if spec.get("sys_path"):  # another version of pipesched (an A/B against a baseline tree)
            sys.path.insert(0, str(spec["sys_path"]))
            for module in [m for m in sys.modules if m == "pipesched" or m.startswith("pipesched.")]:
                del sys.modules[module]  # imported by benchmarks.workloads; import the baseline's instead
        torch.set_num_threads(int(spec.get("threads", 1)))
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=float(spec.get("timeout", 120))),
        )
        if spec["mode"] == "hf-pipelining":  # benchmark 16: a Hugging Face model, traced by torch
            from benchmarks.hf_peer import TorchPipeliningHF
            from benchmarks.hf_workload import HFWorkload

            runner: Any = TorchPipeliningHF(HFWorkload(**spec["workload"]), rank, world)
        elif spec["mode"] == "pipelining":
            runner = _Pipelining(Workload(**spec["workload"]), spec.get("schedule", "1f1b"), list(spec["balance"]), rank, world)
        elif spec["mode"] == "pipesched":
            runner = _Pipesched(Workload(**spec["workload"]), spec.get("schedule", "1f1b"), list(spec["balance"]))
        elif spec["mode"] == "ddp":
            runner = _DataParallel(Workload(**spec["workload"]), rank, world)
        else:
            raise ValueError(f"unknown peer mode {spec['mode']!r}")
        results.put(("ready", rank, {"threads": torch.get_num_threads(),
                                     "build_seconds": getattr(runner, "build_seconds", None)}))
        while True:
            command, argument = commands.get()
            if command == "stop":
                break
            if command == "run":
                dist.barrier()
                start, cpu = time.perf_counter(), time.process_time()
                for _ in range(int(argument)):
                    runner.step()
                cpu = time.process_time() - cpu  # this process's CPU seconds, every thread (before the barrier)
                dist.barrier()
                results.put(("ok", rank, (time.perf_counter() - start, cpu)))
            elif command == "grads":
                runner.step()
                grads = runner.grads() if hasattr(runner, "grads") else {
                    name: p.grad.detach().numpy().copy()
                    for name, p in runner.model.named_parameters()
                    if p.grad is not None
                }
                results.put(("ok", rank, grads))
            else:
                raise ValueError(f"unknown command {command!r}")
    except BaseException:  # noqa: BLE001 - the benchmark process reports it
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
