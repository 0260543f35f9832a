"""Where a skippable layer's stashes go and its pops come from, per thread.

A :class:`~pipesched.runtime.skip.skippable.Skippable` never knows whether it
runs in a pipeline: it hands stashes to, and takes pops from, the calling
thread's *tracker*. Outside a pipeline that is a plain per-thread dict
(:class:`SkipTracker`, as torchgpipe's), so ``nn.Sequential(Stash(), Pop())``
works when called directly: the stash and the pop happen in the same call on
the same thread. Inside a pipeline, the worker running a stage's forward
installs a :class:`~pipesched.runtime.skip.portal.StageTracker` for that one
call, which sends what is popped on another stage and receives what another
stage stashed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import Tensor

from pipesched.runtime.skip.namespace import Namespace

#: A skip tensor's full name: its namespace (``None``: the default one) and its name.
SkipKey = tuple[Namespace | None, str]


class SkipTracker:
    """Skip tensors stashed and not yet popped, by ``(namespace, name)``.

    :meth:`load` hands a tensor over and forgets it, so a tensor popped is
    not kept alive by the tracker.
    """

    def __init__(self) -> None:
        self.tensors: dict[SkipKey, Tensor | None] = {}

    def save(self, key: SkipKey, tensor: Tensor | None) -> None:
        self.tensors[key] = tensor

    def load(self, key: SkipKey) -> Tensor | None:
        """The tensor stashed under ``key``; ``KeyError`` when none is."""
        return self.tensors.pop(key)


class _ThreadTracker(threading.local):
    tracker: SkipTracker | None = None


_current = _ThreadTracker()


def current_skip_tracker() -> SkipTracker:
    """The calling thread's tracker: the one installed by :func:`use_skip_tracker`, else its own default."""
    tracker = _current.tracker
    if tracker is None:
        tracker = _current.tracker = SkipTracker()
    return tracker


@contextlib.contextmanager
def use_skip_tracker(tracker: SkipTracker) -> Iterator[SkipTracker]:
    """Make ``tracker`` the calling thread's tracker inside the block (blocks nest)."""
    previous = _current.tracker
    _current.tracker = tracker
    try:
        yield tracker
    finally:
        _current.tracker = previous
