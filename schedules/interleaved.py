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

from pipesched.plan.schedule import Action, Plan, Schedule, one_forward_one_backward


class Interleaved1F1B(Schedule):
    name = "interleaved-1f1b"

    def __init__(self, virtual_stages: int = 2):
        if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 2:
            raise ValueError(
                f"virtual_stages (stages per rank) must be an int >= 2, got {virtual_stages!r}"
            )
        self.virtual_stages = virtual_stages

    def default_num_stages(self, num_ranks: int) -> int:
        return self.virtual_stages * num_ranks

    def _chunks(self, num_stages: int, num_ranks: int) -> int:
        if num_stages % num_ranks or num_stages < 2 * num_ranks:
            raise ValueError(
                f"schedule {self.name!r} needs the number of stages to be a multiple >= 2 of "
                f"the number of ranks, got {num_stages} stages for {num_ranks} ranks: use a "
                f"balance with {2 * num_ranks} (or {3 * num_ranks}, ...) entries, or "
                f"schedule='1f1b' for one stage per rank"
            )
        return num_stages // num_ranks

    def placement(self, num_stages: int, num_ranks: int) -> list[int]:
        self._chunks(num_stages, num_ranks)
        return [stage % num_ranks for stage in range(num_stages)]

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        chunks = self._chunks(num_stages, num_ranks)
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
