"""Skip connections across stages (torchgpipe's ``torchgpipe.skip``); import them from :mod:`pipesched.skip`.

* :mod:`.skippable`: the user's API (``@skippable``, ``stash``, ``pop``, ``verify_skippables``);
* :mod:`.namespace`: ``Namespace``, to reuse one skippable class several times;
* :mod:`.tracker`: where stashes go and pops come from, per thread;
* :mod:`.layout`: which stage stashes and pops each name, as plan edges;
* :mod:`.portal`: skip tensors and their gradients in a pipeline step.
"""

from pipesched.runtime.skip.namespace import Namespace
from pipesched.runtime.skip.skippable import (
    Skippable,
    pop,
    skippable,
    stash,
    verify_skippables,
)

__all__ = ["Namespace", "Skippable", "pop", "skippable", "stash", "verify_skippables"]
