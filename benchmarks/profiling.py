"""``--profile DIR``: run a benchmark under ``torch.profiler`` and write its trace.

The trace (``DIR/<name>.trace.json``) opens in ui.perfetto.dev or
chrome://tracing. pipesched runs each rank on its own worker thread, and
``torch.profiler`` by default records only the thread that started it, so
the profiler is started with ``profile_all_threads=True`` (an experimental
option of torch >= 2.6): the workers' ops, and the pipeline's per-task labels
where the engine emits them, land on one track per thread. Gloo peer
processes a benchmark spawns are not in the trace (each is its own process).

Profiling costs time per op: figures measured under ``--profile`` are not
comparable with plain runs, and the suite says so next to the table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


def _all_threads_config() -> object | None:
    """``_ExperimentalConfig(profile_all_threads=True)``, or None on a torch without the option."""
    try:
        from torch._C._profiler import _ExperimentalConfig

        return _ExperimentalConfig(profile_all_threads=True)
    except (ImportError, TypeError):
        return None


@contextlib.contextmanager
def profiled(name: str, directory: Path | None) -> Iterator[Path | None]:
    """Run the body under ``torch.profiler`` (CPU, and CUDA when present); write ``directory/name.trace.json``.

    ``directory=None`` runs the body as it is and yields None. The path is
    yielded up front; the file exists once the block is left.
    """
    if directory is None:
        yield None
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.trace.json"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    config = _all_threads_config()
    options = {} if config is None else {"experimental_config": config}
    with torch.profiler.profile(activities=activities, **options) as profiler:
        yield path
    profiler.export_chrome_trace(str(path))
