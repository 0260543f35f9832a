"""The command loop of a gloo peer process that :class:`benchmarks.gloo_peers.GlooPeers` drives.

A worker module gives :func:`serve_commands` its handlers; the loop joins the
group (one intra-op thread), says it is ready, then answers each command
with its handler's result until ``stop``. Any exception is replied as
``("error", rank, traceback)``, so the parent raises it instead of waiting.
"""

from __future__ import annotations

import datetime
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def serve_commands(rank: int, world: int, port: int, commands: Any, results: Any,
                   handlers: dict[str, Callable[[Any], Any]], setup: Callable[[], None] | None = None) -> None:
    """Join the gloo group on 127.0.0.1:``port``, run ``setup()``, then serve ``handlers[command](argument)``."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        if setup is not None:
            setup()
        results.put(("ready", rank, {"threads": torch.get_num_threads()}))
        while True:
            command, argument = commands.get()
            if command == "stop":
                break
            if command not in handlers:
                raise ValueError(f"unknown command {command!r}; this peer serves {sorted(handlers)}")
            results.put(("ok", rank, handlers[command](argument)))
    except BaseException:  # noqa: BLE001 - the benchmark process reports it
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
