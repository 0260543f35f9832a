"""Looped BFS: breadth-first over several stages per rank (Lamy-Poirier, 2023, "Breadth-First Pipeline Parallelism").

Stage ``s`` lives on rank ``s % p`` (``v`` = ``virtual_stages`` stages per
rank, as in interleaved 1F1B). Each rank runs the forwards of *all*
micro-batches through its first stage, then through its second, and so on;
then the backwards, last stage first, micro-batches in reverse::

    rank 0 │F0.0 F0.1 F0.2 F0.3 F2.0 F2.1 F2.2 F2.3  ...  B2.3 B2.2 B2.1 B2.0 B0.3 ...

It is GPipe over a looped placement: one fill and one drain for the whole
step, ``(p - 1)(f + b)`` of bubble with ``f``, ``b`` one *stage's* forward and
(whole) backward, ``v`` times less than GPipe's on the same ranks, and every
rank holds all ``v·m`` (stage, micro-batch) activations at the turn, like
GPipe. What it buys is locality: a rank runs one stage for a
long stretch (weights stay hot; with sharded data parallelism, one gather
serves every micro-batch), and a micro-batch's whole backward of a stage runs
at once.

Backwards are not split: with every forward done first there is no wait in
the middle to fill, only the drain, and an unsplit backward keeps the plan
runnable by every engine (W actions need one that runs them). That is also
the order torch's ScheduleLoopedBFS runs.
"""

from __future__ import annotations

from pipesched.plan.schedule import Action, LoopedSchedule, Plan


class LoopedBFS(LoopedSchedule):
    name = "looped-bfs"
    one_stage_per_rank = "gpipe"

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        chunks = self.stages_per_rank(num_stages, num_ranks)
        mbs = range(num_microbatches)
        return [
            [Action("F", chunk * num_ranks + rank, mb) for chunk in range(chunks) for mb in mbs]
            + [Action("B", chunk * num_ranks + rank, mb) for chunk in reversed(range(chunks)) for mb in reversed(mbs)]
            for rank in range(num_ranks)
        ]
