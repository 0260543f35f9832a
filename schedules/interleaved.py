"""Interleaved 1F1B: several model chunks per rank (Narayanan et al., 2021, Megatron-LM).

With ``v`` stages per rank (stage ``s`` on rank ``s % p``), each rank alternates
between its chunks so the pipeline fills ``v`` times faster: the bubble shrinks
from ``(p - 1)(F + B)`` to ``(p - 1)(F + B) / v`` at the price of ``v`` times
more transfers.

Micro-batches are taken in ``max(1, m // p)`` groups whose sizes differ by at
most one, larger first, so every group but a lone one holds at least ``p``
micro-batches: a rank runs chunk 0 of the group's micro-batches, then chunk 1,
and so on; backwards visit the chunks in reverse. Rank ``r`` warms up with
``2(p - 1 - r) + (v - 1)·g`` forwards (``g`` the first group's size), then
alternates F and B like 1F1B. With ``m`` a multiple of ``p`` this is Megatron's
order; groups of exactly ``p`` with a smaller last one (Megatron's order for
other ``m``) deadlock for ``v >= 3``, which the plan validator catches.
"""

from __future__ import annotations

from pipesched.plan.schedule import Action, LoopedSchedule, Plan, one_forward_one_backward


class Interleaved1F1B(LoopedSchedule):
    name = "interleaved-1f1b"
    one_stage_per_rank = "1f1b"

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        chunks = self.stages_per_rank(num_stages, num_ranks)
        p, m = num_ranks, num_microbatches
        rounds = max(1, m // p)
        sizes = [m // rounds + (1 if i < m % rounds else 0) for i in range(rounds)]
        groups, first = [], 0
        for size in sizes:
            groups.append(range(first, first + size))
            first += size

        def order(rank: int, kind: str) -> list[Action]:
            actions = []
            for group in groups:
                chunk_order = range(chunks) if kind == "F" else reversed(range(chunks))
                for chunk in chunk_order:
                    actions += [Action(kind, chunk * p + rank, mb) for mb in group]  # type: ignore[arg-type]
            return actions

        first_group = sizes[0]
        return [
            one_forward_one_backward(
                order(rank, "F"),
                order(rank, "B"),
                warmup=2 * (p - 1 - rank) + (chunks - 1) * first_group,
            )
            for rank in range(p)
        ]
