"""The task log on disk: structlog writes it as JSON lines, the timeline reads it back.

One ``"task"`` event per executed action (and, in multi-process pipelines,
one ``"comm"`` event per transfer), each a JSON object per line, so any tool
can read it; :class:`pipesched.Timeline` turns it back into an analysis.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable
from typing import IO, Any


def configure_jsonl_logging(path_or_file: str | os.PathLike[str] | IO[str], mode: str = "a") -> IO[str]:
    """Configure structlog so every pipesched task event is one JSON line in ``path_or_file``.

    Call it before ``pipe.step()``; the engine logs only when structlog is
    configured. A path is opened with ``mode`` (``"a"`` appends, so several
    runs can share a file; :meth:`Timeline.from_jsonl` picks a step). Returns
    the open file, which the caller may close when done (steps after that warn
    that they cannot log, and still succeed; configure a new log or call
    ``structlog.reset_defaults()``). This is the same as::

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


class EventLog:
    """Emits a pipeline's structlog events; a failure to log warns and never fails a step.

    Logging is a by-product of training: a closed log file, a full disk or a
    broken processor must not throw away a step whose gradients are already
    computed. Each distinct failure is warned about once per pipeline, so a log
    that stays broken does not flood the caller with warnings.
    """

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def emit(self, event: str, fields: Iterable[dict[str, Any]]) -> None:
        """One ``event`` per dict of ``fields``, if structlog is configured (nothing is printed otherwise).

        ``fields`` is consumed only when the event would be written: with
        structlog unconfigured, or configured to filter out info events, a
        step builds none of its task events.
        """
        import structlog

        if not structlog.is_configured():
            return
        try:
            logger = structlog.get_logger("pipesched").bind()
            enabled = getattr(logger, "is_enabled_for", None)  # a filtering logger set above info: nobody listens
            if enabled is not None and not enabled(logging.INFO):
                return  # nothing built or rendered for events that would be dropped
            for values in fields:
                logger.info(event, **values)
        except Exception as error:  # noqa: BLE001 - logging must never fail the step
            reason = f"{type(error).__name__}: {error}"
            if reason in self._warned:
                return
            self._warned.add(reason)
            warnings.warn(
                f"pipesched could not log its {event!r} events ({reason}); the step itself succeeded. "
                f"Reconfigure structlog (e.g. a new configure_jsonl_logging(...) after closing its "
                f"file, or structlog.reset_defaults()), or build the pipeline with log_tasks=False",
                RuntimeWarning,
                stacklevel=2,
            )


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
