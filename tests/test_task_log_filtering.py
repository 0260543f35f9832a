"""The step's task events cost nothing when nobody listens (structlog unconfigured, or filtering out info)."""

from __future__ import annotations

import logging

import structlog

from pipesched.observe.tasklog import EventLog


def test_task_events_are_not_built_when_structlog_filters_out_info():
    """A filtering logger above info listens to nobody: the step must not build its events (nor fail)."""
    built = []

    def fields():
        built.append(1)
        yield {"x": 1}

    try:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        EventLog().emit("task", fields())
        assert built == []
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                            logger_factory=structlog.ReturnLoggerFactory())
        EventLog().emit("task", fields())
        assert built == [1]
    finally:
        structlog.reset_defaults()
