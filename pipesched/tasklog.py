"""The task log on disk: structlog writes it as JSON lines, the timeline reads it back.

One ``"task"`` event per executed action (and, in multi-process pipelines,
one ``"comm"`` event per transfer), each a JSON object per line, so any tool
can read it; :class:`pipesched.Timeline` turns it back into an analysis.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any


def configure_jsonl_logging(path_or_file: str | os.PathLike[str] | IO[str], mode: str = "a") -> IO[str]:
    """Configure structlog so every pipesched task event is one JSON line in ``path_or_file``.

    Call it before ``pipe.step()``; the engine logs only when structlog is
    configured. A path is opened with ``mode`` (``"a"`` appends, so several
    runs can share a file; :meth:`Timeline.from_jsonl` picks a step). Returns
    the open file, which the caller may close when done. This is the same as::

        import structlog
        structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
                            logger_factory=structlog.WriteLoggerFactory(file=open("run.jsonl", "a")))

    Note that this replaces the process's structlog configuration (processors
    and logger factory); ``structlog.reset_defaults()`` undoes it.
    """
    import structlog

    if isinstance(path_or_file, (str, os.PathLike)):
        file: IO[str] = open(path_or_file, mode, encoding="utf-8")  # noqa: SIM115 - returned to the caller
    elif callable(getattr(path_or_file, "write", None)):
        file = path_or_file
    else:
        raise TypeError(
            f"path_or_file must be a path or a text file open for writing, got {type(path_or_file).__name__}"
        )
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.WriteLoggerFactory(file=file),
    )
    return file


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """Every JSON object in the log at ``path``; a line that is not JSON is an error naming it."""
    events = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number} is not JSON ({error.msg}); the log must be written by "
                    f"structlog's JSONRenderer (see configure_jsonl_logging)"
                ) from None
    return events
