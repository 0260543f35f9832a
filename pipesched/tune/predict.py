"""Price one pipeline configuration from a profile: step time by the simulator, peak bytes per rank.

Time: the schedule's plan replayed (:func:`pipesched.plan.simulate.simulate`)
on per-(stage, micro-batch) costs summed from the profile taken at that
micro-batch's size: F is the stage's forward; an unsplit B its whole
backward; a split B its input-gradient part and W its weight-gradient part.
A checkpointed micro-batch's B also pays the recompute (one more forward).
Every task also pays ``overhead_s``, the engine's own cost per task
(:func:`pipesched.tune.overhead.engine_overhead`), so a plan with more tasks
(split backwards) pays for them. A schedule built for the costs (``"auto"``)
is handed the profile's per-stage table first (:func:`stage_cost_table`: F, the
split B and W, and the whole backward BW), so the plan priced is the one it
would synthesise, not its warm-up. Communication is priced 0 (ranks on one host share memory; on separate
devices, add it to your budget of doubt).

Memory, per rank, what is counted:

* activations, exactly as the checkpoint manager meters them (and
  ``pipe.last_report.peak_activation_bytes`` reports): walking the rank's
  actions in plan order, F adds what its (stage, micro-batch) keeps for
  backward (the stage input plus every tensor its layers save; only the stage
  input when checkpointed), a checkpointed B adds the rebuilt tensors for its
  own duration, and the backward releases it all. A split backward holds
  until its W the activations plus the incoming gradient W still needs (at
  most the stage output's size): an upper bound, since B already freed what
  W does not need (exact for unsplit backwards; tests compare both with
  ``pipe.last_report``);
* the parameters and buffers of the rank's stages, and one gradient per
  parameter that requires grad.

Not counted: optimizer state (add it to the budget's margin, e.g. 2 × the
parameters for Adam), tensors in transit between ranks, the caller's batch,
and the allocator's own slack and per-kernel workspace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipesched.plan.action import Action, split_backwards
from pipesched.plan.costs import FUSED
from pipesched.plan.record import TaskRecord
from pipesched.plan.schedule import Schedule, validate_placement
from pipesched.plan.simulate import simulate
from pipesched.runtime.checkpoint import make_policy
from pipesched.tune.costs import Profile, StageCost

__all__ = ["Prediction", "predict", "stage_cost_table"]


@dataclass(frozen=True)
class Prediction:
    """What :func:`predict` expects of one configuration (seconds, bytes per rank)."""

    step_s: float
    peak_bytes: list[int]
    activation_bytes: list[int]
    parameter_bytes: list[int]
    peak_inflight: list[int]
    bubble: float


def predict(
    schedule: Schedule,
    balance: Sequence[int],
    num_ranks: int,
    sizes: Sequence[int],
    profiles: Mapping[int, Profile],
    checkpoint: str,
    overhead_s: float = 0.0,
) -> Prediction:
    """Simulated step time and peak bytes of ``schedule`` with ``balance`` on ``num_ranks`` ranks.

    ``sizes``: rows of each micro-batch (``len(sizes)`` micro-batches);
    ``profiles[rows]``: the profile taken at that size. Raises ``ValueError``
    when the schedule cannot run this shape. ``overhead_s``: seconds the
    engine adds to every task.
    """
    num_stages, count = len(balance), len(sizes)
    placement = validate_placement(schedule.placement(num_stages, num_ranks), num_stages, num_ranks)
    policy = make_policy(checkpoint)
    stage_costs: dict[int, list[StageCost]] = {rows: profiles[rows].stages(balance) for rows in set(sizes)}
    if schedule.wants_costs:
        schedule.use_costs(stage_cost_table(stage_costs[max(sizes)], policy, count, overhead_s))
    plan = schedule.plan(num_stages, count, num_ranks)

    def cost(stage: int, mb: int) -> StageCost:
        return stage_costs[sizes[mb]][stage]

    split = split_backwards(a for row in plan for a in row)
    records = []
    for rank, row in enumerate(plan):
        for action in row:
            c = cost(action.stage, action.microbatch)
            if action.kind == "F":
                seconds = c.forward_s
            elif action.kind == "W":
                seconds = c.backward_weight_s
            else:
                seconds = c.backward_input_s if (action.stage, action.microbatch) in split else c.backward_s
                if policy(action.stage, action.microbatch, count):
                    seconds += c.forward_s  # the recompute
            records.append(TaskRecord(rank, action.stage, action.microbatch, action.kind, 0.0,
                                      seconds + overhead_s))
    sim = simulate(plan, records, num_stages=num_stages)

    activations = [_peak_activation_bytes(row, split, cost, policy, count, sum(sizes), sizes.__getitem__)
                   for row in plan]
    params = [0] * num_ranks
    for stage, rank in enumerate(placement):
        first = stage_costs[sizes[0]][stage]
        params[rank] += first.parameter_bytes + first.grad_bytes
    return Prediction(
        step_s=sim.makespan,
        peak_bytes=[a + p for a, p in zip(activations, params)],
        activation_bytes=activations,
        parameter_bytes=params,
        peak_inflight=list(sim.peak_inflight),
        bubble=sim.overall_bubble_over_total,
    )


def stage_cost_table(stages: Sequence[StageCost], policy, count: int,
                     overhead_s: float = 0.0) -> dict[tuple[str, int], float]:
    """``{(kind, stage): seconds}`` as a schedule built for costs reads them: F, split B and W, whole BW.

    A stage checkpointed for its first micro-batch pays the recompute in B and BW.
    """
    table: dict[tuple[str, int], float] = {}
    for s, c in enumerate(stages):
        recompute = c.forward_s if policy(s, 0, count) else 0.0
        table.update({("F", s): c.forward_s + overhead_s, ("B", s): c.backward_input_s + recompute + overhead_s,
                      ("W", s): c.backward_weight_s + overhead_s, (FUSED, s): c.backward_s + recompute + overhead_s})
    return table


def _peak_activation_bytes(row: Sequence[Action], split: frozenset[tuple[int, int]] | set[tuple[int, int]],
                           cost, policy, count: int, batch_rows: int,
                           sizes_of) -> int:
    """The checkpoint manager's peak for one rank running ``row`` in order (see the module docstring)."""
    held: dict[tuple[int, int], int] = {}
    current = peak = 0
    for action in row:
        key = (action.stage, action.microbatch)
        c = cost(*key)
        checkpointed = policy(action.stage, action.microbatch, count)
        if action.kind == "F":
            held[key] = c.input_bytes if checkpointed else c.activation_bytes
            current += held[key]
        elif action.kind == "B":
            if checkpointed:  # the recompute rebuilds the rest for this backward
                rebuilt = max(0, c.activation_bytes - c.input_bytes)
                held[key] += rebuilt
                current += rebuilt
            peak = max(peak, current)
            if key not in split:
                current -= held.pop(key)
            else:  # W keeps the incoming gradient (at most the output's size) beside the activations
                kept = c.output_bytes
                if action.stage == 0 and c.saves_input:
                    # W's meter counts a saved tensor's whole storage: the first stage's input is a
                    # view of the caller's batch, so it counts the batch (WeightWork.nbytes)
                    rows = sizes_of(action.microbatch)
                    kept += c.input_bytes * (batch_rows - rows) // max(rows, 1)
                held[key] += kept
                current += kept
        else:  # W: a split backward lets go here
            current -= held.pop(key)
        peak = max(peak, current)
    return peak
