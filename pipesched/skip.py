"""Skip connections, at torchgpipe's import path: ``from pipesched.skip import skippable, stash, pop``.

See :mod:`pipesched.runtime.skip` (and docs/guide/shared-layers-and-skips.md, "Skip connections").
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
