"""1F1B, "one forward, one backward" (PipeDream-Flush, Narayanan et al., 2021).

Rank ``r`` of ``p`` runs ``w = min(p - 1 - r, m)`` warm-up forwards, then
alternates one forward with one backward, then drains the remaining backwards::

    rank 0 │F0.0 F0.1 F0.2           B0.0 F0.3 B0.1 ...
    rank 1 │     F1.0 F1.1      B1.0 F1.2 B1.1 ...
    rank 2 │          F2.0 B2.0 F2.1 B2.1 ...

Same makespan as GPipe, ``(m + p - 1)(F + B)`` with uniform costs, but rank
``r`` never holds more than ``p - r`` micro-batches' activations at once,
independent of ``m``.
"""

from __future__ import annotations

from pipesched.plan.schedule import (
    Action,
    Plan,
    Schedule,
    one_forward_one_backward,
    require_one_stage_per_rank,
)


class OneFOneB(Schedule):
    name = "1f1b"

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        require_one_stage_per_rank(self.name, num_stages, num_ranks)
        return [
            one_forward_one_backward(
                [Action("F", rank, mb) for mb in range(num_microbatches)],
                [Action("B", rank, mb) for mb in range(num_microbatches)],
                warmup=num_ranks - 1 - rank,
            )
            for rank in range(num_ranks)
        ]
