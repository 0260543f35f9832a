"""One configuration the tuner ranks: a pipeline (schedule, balance, chunks, checkpoint), or none at all.

Not pipelining is a candidate too (:data:`NO_PIPELINE`): the plain model on
one device, or gradient accumulation over the same micro-batches. On a CPU,
or with small layers, it often wins; a tuner that never compares with it
recommends a pipeline that only costs time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["NO_PIPELINE", "Candidate"]

#: ``Candidate.schedule`` of "don't pipeline": chunks 1 is the plain model, more is gradient accumulation.
NO_PIPELINE = "none"


@dataclass
class Candidate:
    """One configuration and what it costs. Seconds; bytes per rank (rank 0 first).

    ``measured_spread``: (slowest - fastest) / median of the measured steps,
    how much to trust ``measured_step_s`` on this machine.
    """

    schedule: str
    balance: list[int]
    chunks: int
    checkpoint: str
    devices: list[str]
    predicted_step_s: float
    predicted_peak_bytes: list[int]
    predicted_bubble: float = 0.0
    fits: bool = True
    measured_step_s: float | None = None
    measured_peak_bytes: list[int] | None = None
    measured_spread: float | None = None

    @property
    def pipelined(self) -> bool:
        """False for the "don't pipeline" candidates (:data:`NO_PIPELINE`)."""
        return self.schedule != NO_PIPELINE

    @property
    def label(self) -> str:
        if self.pipelined:
            return f"{self.schedule} chunks={self.chunks} checkpoint={self.checkpoint}"
        return "no pipeline" if self.chunks == 1 else f"no pipeline, accumulate {self.chunks} micro-batches"

    @property
    def prediction_error(self) -> float | None:
        """(predicted - measured) / measured, once measured."""
        if self.measured_step_s is None or self.measured_step_s <= 0:
            return None
        return (self.predicted_step_s - self.measured_step_s) / self.measured_step_s

    def pipeline_kwargs(self) -> dict[str, Any]:
        """``Pipeline(model, **candidate.pipeline_kwargs(), loss_fn=...)``."""
        if not self.pipelined:
            raise ValueError(
                f"this candidate is not a pipeline ({self.label}): train the model as it is"
                + ("" if self.chunks == 1 else f", accumulating gradients over {self.chunks} micro-batches")
                + "; for the best pipeline use result.best_pipelined.pipeline_kwargs()"
            )
        return {"schedule": self.schedule, "balance": list(self.balance), "devices": list(self.devices),
                "chunks": self.chunks, "checkpoint": self.checkpoint}

    def pipeline_line(self, model: str = "model", loss_fn: str = "loss_fn") -> str:
        """The ``Pipeline(...)`` call for this candidate, as Python source (a comment when it is none)."""
        if not self.pipelined:
            how = "" if self.chunks == 1 else f" over {self.chunks} micro-batches (gradient accumulation)"
            return f"# no pipeline: {loss_fn}({model}(x), y).backward() on {self.devices[0]}{how}"
        args = ", ".join(f"{k}={v!r}" for k, v in self.pipeline_kwargs().items())
        return f"Pipeline({model}, {args}, loss_fn={loss_fn})"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
