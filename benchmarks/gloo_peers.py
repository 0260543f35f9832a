"""Two (or more) gloo processes on 127.0.0.1, driven command by command from the benchmark.

::

    with GlooPeers(spec) as peers:      # spawns, joins the group, builds the model
        seconds = peers.run(10)         # 10 steps on every rank, barrier to barrier
        grads = peers.grads()           # one step's gradients, by parameter name

The processes wait on their command queue between calls, so they use no CPU
while the in-process contender is timed: rounds can alternate between the
peer and pipesched. A free port is picked per group; ``close()`` (or leaving
the ``with`` block, also on error) stops the processes, and kills any that do
not stop. The processes are daemons, so they die with the benchmark too.
"""

from __future__ import annotations

import queue
import socket
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from benchmarks import peer_worker


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PeerError(RuntimeError):
    pass


class GlooPeers:
    def __init__(self, spec: dict[str, Any], world: int = 2, timeout: float = 180.0, target: Any = None):
        """``target(rank, world, port, spec, commands, results)`` is what each process runs
        (default :func:`benchmarks.peer_worker.serve`); it must answer as ``serve`` does."""
        self.world = world
        self.timeout = timeout
        ctx = mp.get_context("spawn")
        self.port = free_port()
        self.commands = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=peer_worker.serve if target is None else target,
                args=(rank, world, self.port, spec, self.commands[rank], self.results),
                name=f"gloo-peer-{rank}",
                daemon=True,
            )
            for rank in range(world)
        ]
        self.info: dict[int, Any] = {}
        self.cpu_seconds: list[float] = []
        try:
            for proc in self.procs:
                proc.start()
            for rank, payload in self._collect("ready").items():
                self.info[rank] = payload
        except BaseException:
            self.close()
            raise

    def _collect(self, expected: str) -> dict[int, Any]:
        replies: dict[int, Any] = {}
        while len(replies) < self.world:
            try:
                status, rank, payload = self.results.get(timeout=self.timeout)
            except queue.Empty:
                codes = {p.name: p.exitcode for p in self.procs}
                raise PeerError(f"gloo peers did not answer within {self.timeout:.0f} s (exit codes {codes})") from None
            if status == "error":
                raise PeerError(f"gloo peer rank {rank} failed:\n{payload}")
            if status != expected:
                raise PeerError(f"gloo peer rank {rank} replied {status!r}, expected {expected!r}")
            replies[rank] = payload
        return replies

    def ask(self, command: str, argument: Any = None) -> dict[int, Any]:
        """Send ``(command, argument)`` to every process; their ``"ok"`` replies by rank."""
        for q in self.commands:
            q.put((command, argument))
        return self._collect("ok")

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` steps (the slowest rank's barrier-to-barrier time).

        ``cpu_seconds`` keeps, per run, the CPU seconds all ranks used together
        (a figure other processes on a shared machine disturb far less than wall time).
        """
        replies = self.ask("run", steps).values()
        self.cpu_seconds.append(sum(cpu for _, cpu in replies))
        return max(wall for wall, _ in replies)

    def grads(self) -> dict[str, torch.Tensor]:
        """One step's gradients from zero, merged over ranks, keyed by full-model parameter name."""
        merged: dict[str, torch.Tensor] = {}
        for _, grads in sorted(self.ask("grads").items()):
            for name, array in grads.items():
                merged[name] = torch.from_numpy(np.asarray(array))
        return merged

    def close(self) -> None:
        for q, proc in zip(self.commands, self.procs):
            if proc.is_alive():
                try:
                    q.put(("stop", None))
                except (OSError, ValueError):
                    pass
        for proc in self.procs:
            if proc.pid is None:
                continue
            proc.join(timeout=15)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for q in [*self.commands, self.results]:
            q.close()
            q.cancel_join_thread()

    def __enter__(self) -> GlooPeers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
