"""Skip connections, at torchgpipe's import path: ``from pipesched.skip import skippable, stash, pop``.

See :mod:`pipesched.runtime.skip` (and the README, "Skip connections").
"""

from pipesched.runtime.skip import (
    Namespace,
    Skippable,
    pop,
    skippable,
    stash,
    verify_skippables,
)

__all__ = ["Namespace", "Skippable", "pop", "skippable", "stash", "verify_skippables"]
