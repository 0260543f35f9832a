"""GPipe fill-drain: every forward, then every backward (Huang et al., 2019).

::

    rank 0 │F0.0 F0.1 F0.2                B0.2 B0.1 B0.0
    rank 1 │     F1.0 F1.1 F1.2      B1.2 B1.1 B1.0
    rank 2 │          F2.0 F2.1 F2.2 B2.2 ...

Backwards run in reverse micro-batch order, as one autograd pass over the
concatenated batch would; that is why the last micro-batch need not be
checkpointed (its backward follows its forward at once). With uniform costs the
makespan is ``(m + p - 1)(F + B)``, and every rank holds all ``m``
micro-batches' activations at the turn.
"""

from __future__ import annotations

from pipesched.plan.schedule import Action, Plan, Schedule, require_one_stage_per_rank


class GPipe(Schedule):
    name = "gpipe"

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        require_one_stage_per_rank(self.name, num_stages, num_ranks)
        return [
            [Action("F", stage, mb) for mb in range(num_microbatches)]
            + [Action("B", stage, mb) for mb in reversed(range(num_microbatches))]
            for stage in range(num_stages)
        ]
