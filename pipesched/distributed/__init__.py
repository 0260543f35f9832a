"""The same schedules with one process per rank, on ``torch.distributed`` (launched by torchrun).

::

    from pipesched.distributed import DistributedPipeline
"""

from pipesched.distributed.errors import PeerLost, RemoteStepError
from pipesched.distributed.pipeline import DistributedPipeline

__all__ = ["DistributedPipeline", "PeerLost", "RemoteStepError"]
