"""The frame of one process of a multi-process test: join the gloo world, run, write the verdicts.

``body(out)`` fills ``out``; a crash is reported through it (``out["crash"]``),
which ``test_distributed.run_world`` turns into the failing rank's traceback.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist


def run_in_world(rank: int, world: int, port: int, directory: str, body: Callable[[dict], None]) -> None:
    """Run ``body`` in rank ``rank`` of a ``world``-process gloo group; verdicts to ``rank<r>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out: dict = {}
    try:
        body(out)
    except BaseException:  # noqa: BLE001 - reported to the test through the file
        out["crash"] = traceback.format_exc()
    finally:
        with open(os.path.join(directory, f"rank{rank}.json"), "w") as file:
            json.dump(out, file)
        dist.destroy_process_group()
