"""The same schedules with one process per rank, on ``torch.distributed`` (launched by torchrun).

::

    from pipesched.distributed import DistributedPipeline
"""

from pipesched.distributed.checkpointing import load_optimizer_state_dict, optimizer_state_dict
from pipesched.distributed.errors import PeerLost, RemoteStepError
from pipesched.distributed.pipeline import DistributedPipeline

__all__ = ["DistributedPipeline", "PeerLost", "RemoteStepError", "load_optimizer_state_dict", "optimizer_state_dict"]
