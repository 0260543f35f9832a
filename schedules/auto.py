"""``"auto"``: a plan synthesised for the model's costs, never slower in simulation than the built-ins.

Every built-in schedule is drawn for one point (F = B = W, free links) and
its own memory. ``auto`` instead builds the plan for the costs it is given
(or measures): it simulates the built-in plans of the same placement that fit
the memory cap, then searches for a faster order with list scheduling and
local search (:func:`pipesched.plan.synthesis.synthesise`), and keeps the
built-in one unless it finds a strictly faster one::

    get_schedule("auto", costs={("F", 0): 1.0, ("B", 0): 1.0, ("W", 0): 0.5, ...},
                 memory_limit=4, placement="contiguous")

* ``costs``: seconds per ``(kind, stage)`` (a dict, or a callable), as
  :func:`pipesched.plan.simulate.simulate` reads them; ``("bytes", s)`` entries
  (activation bytes one micro-batch keeps on stage ``s``) make
  ``memory_limit`` a number of bytes. Left out, the schedule learns them:
  in a ``Pipeline`` the first step runs a safe built-in plan (1F1B for
  ``"contiguous"``, interleaved 1F1B for ``"looped"``, ZB-V for ``"v"``)
  with every other backward split (W right after its B) and the rest whole,
  so each stage's split B and W *and* its whole backward are measured, at
  1F1B's memory; from the next step on the plan is synthesised from the
  measured median time of each ``(kind, stage)`` plus the engine's cost per
  task. An unsplit backward is priced at its measured whole cost (``BW``),
  not B + W: on small layers splitting costs more than the bubble it
  removes, and then the fastest plan found is a 1F1B-like order.
* ``memory_limit``: the most each rank may hold at once: (stage,
  micro-batch) pairs in flight, or bytes when ``costs`` carries them;
  ``None``: no cap (the fastest plan found, whatever it holds).
* ``placement``: ``"contiguous"`` (stage s on rank s), ``"looped"`` (stage s on
  rank ``s mod p``, ``virtual_stages`` per rank) or ``"v"`` (rank r holds
  stages r and 2p-1-r).
* ``comm``: seconds added to every cross-rank dependency.

The plan is synthesised per micro-batch count (the pipeline asks again when
the count changes). :meth:`Auto.describe_plan` (what ``last_report.plan``
shows) says which plan ran: the warm-up, or the synthesised one and the
simulated step time of every built-in it was compared with, on the same costs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pipesched.plan.costs import FUSED, check_comm
from pipesched.plan.registry import get_schedule
from pipesched.plan.schedule import (
    Plan,
    Schedule,
    defer_weight_passes,
    require_one_stage_per_rank,
    require_v_shape,
    v_shape_placement,
)
from pipesched.plan.simulate import peak_inflight
from pipesched.plan.synthesis import Synthesis, check_costs, check_memory_limit, synthesise

#: The built-in schedules of each placement: the seeds ``auto`` starts from and never loses to.
BUILT_INS = {
    "contiguous": ("gpipe", "1f1b", "zb-h1"),
    "looped": ("looped-bfs", "interleaved-1f1b", "interleaved-zb"),
    "v": ("zb-v", "dualpipe-v"),
}
#: What runs before any cost is known: a 1F1B-family order, every other backward split (W right after B).
WARM_UP = {"contiguous": "1f1b", "looped": "interleaved-1f1b", "v": "zb-v"}


def merge_measured(old: Mapping[tuple[str, int], float], new: Mapping[tuple[str, int], float],
                   num_stages: int) -> dict[tuple[str, int], float]:
    """The latest step's costs, keeping what only an earlier step measured.

    A step that ran a stage's backwards whole reports them as ``("B", s)`` with
    no W; one that split them reports B, W (and BW when it ran both ways).
    After the warm-up the synthesised plan may split or not, so one step alone
    would forget the other way: the latest figure of each way is kept, so a
    later synthesis (a new micro-batch count) still weighs both.
    """
    merged = dict(new)
    for s in range(num_stages):
        if ("W", s) not in new and ("W", s) in old:  # this step ran stage s whole: B is a whole backward
            merged[(FUSED, s)] = new[("B", s)]
            merged[("B", s)], merged[("W", s)] = old[("B", s)], old[("W", s)]
        elif ("W", s) in new and (FUSED, s) not in new and (FUSED, s) in old:
            merged[(FUSED, s)] = old[(FUSED, s)]
    return merged


#: On measured costs, a plan that splits backwards must beat the fastest built-in that does not
#: by more than this fraction of its simulated step, or that built-in runs. Splitting is where a
#: prediction from one step's medians is least sure (twice the tasks, each smaller, each paying
#: the engine), and on the small GPT a split plan 2 % faster in simulation ran 1.2x slower.
NOISE_MARGIN = 0.05


def _unless_within_noise(found: Synthesis, seeds: Mapping[str, Plan]) -> Synthesis:
    """``found``, or the fastest unsplit built-in when ``found`` splits and is not faster by
    more than :data:`NOISE_MARGIN`."""
    if not any(a.kind == "W" for row in found.plan for a in row):
        return found
    whole = {name: t for name, t in found.compared.items()
             if t is not None and not any(a.kind == "W" for row in seeds[name] for a in row)}
    if not whole:
        return found
    name = min(whole, key=lambda n: (whole[n], max(peak_inflight(row) for row in seeds[n])))  # tie: less memory
    if found.makespan < whole[name] * (1 - NOISE_MARGIN):
        return found
    gain = 1 - found.makespan / whole[name] if whole[name] else 0.0
    return replace(found, plan=seeds[name], makespan=whole[name],
                   method=f"{name}: the best plan that splits backwards ({found.method}) was only "
                          f"{100 * gain:.1f} % faster, within the {100 * NOISE_MARGIN:.0f} % noise margin")


class Auto(Schedule):
    name = "auto"

    def __init__(
        self,
        costs: Any = None,
        memory_limit: Any = None,
        placement: str = "contiguous",
        virtual_stages: int = 2,
        comm: float = 0.0,
    ):
        if placement not in BUILT_INS:
            raise ValueError(
                f"placement must be one of {', '.join(map(repr, BUILT_INS))}, got {placement!r}"
            )
        if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 2:
            raise ValueError(f"virtual_stages (stages per rank, looped placement) must be an int >= 2, got {virtual_stages!r}")
        if costs is not None and (isinstance(costs, (str, bytes)) or not (callable(costs) or isinstance(costs, Mapping))):
            check_costs(costs, 0)  # raises the standard message
        self.costs = costs
        self.memory_limit = check_memory_limit(memory_limit)
        self.kind = placement
        self.virtual_stages = virtual_stages
        self.comm = check_comm(comm)
        self.measured: dict[tuple[str, int], float] | None = None
        self.measured_comm = 0.0
        #: per micro-batch count, the last synthesis (``None``: the warm-up plan ran)
        self.synthesis: dict[int, Synthesis | None] = {}
        #: per micro-batch count, how the costs it was synthesised from priced a whole backward
        self.priced: dict[int, str] = {}

    # ------------------------------------------------------------ placement

    @property
    def wants_costs(self) -> bool:  # type: ignore[override]
        """Costs given up front are final; without them, measured ones are welcome."""
        return self.costs is None

    def default_num_stages(self, num_ranks: int) -> int:
        return {"contiguous": 1, "looped": self.virtual_stages, "v": 2}[self.kind] * num_ranks

    def placement(self, num_stages: int, num_ranks: int) -> list[int]:
        if self.kind == "contiguous":
            require_one_stage_per_rank(self.name, num_stages, num_ranks)
            return list(range(num_stages))
        if self.kind == "v":
            require_v_shape(self.name, num_stages, num_ranks)
            return v_shape_placement(num_stages, num_ranks)
        if num_stages % num_ranks or num_stages < 2 * num_ranks:
            raise ValueError(
                f"schedule 'auto' with placement='looped' needs the number of stages to be a multiple >= 2 "
                f"of the number of ranks, got {num_stages} stages for {num_ranks} ranks: use a balance with "
                f"{2 * num_ranks} (or {3 * num_ranks}, ...) entries, or placement='contiguous'"
            )
        return [stage % num_ranks for stage in range(num_stages)]

    # ----------------------------------------------------------------- plans

    def plan(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan:
        placement = self.placement(num_stages, num_ranks)
        if self.costs is not None:
            costs, comm = self.costs, self.comm
        elif self.measured is not None:
            costs, comm = self.measured, self.measured_comm
        else:
            warm = self._warm_up(num_stages, num_microbatches, num_ranks)
            if warm is not None:
                self.synthesis[num_microbatches] = None
                return warm
            costs, comm = {(k, s): 1.0 for k in "FBW" for s in range(num_stages)}, 0.0
        seeds = self._seeds(costs, comm, num_stages, num_microbatches, num_ranks)
        found = synthesise(placement, num_microbatches, costs, comm=comm, memory_limit=self.memory_limit,
                           seeds=seeds)
        if self.costs is None:
            found = _unless_within_noise(found, dict(seeds))
        self.synthesis[num_microbatches] = found
        self.priced[num_microbatches] = self._whole_price(costs)
        return found.plan

    def _seeds(self, costs: Any, comm: float, num_stages: int, num_microbatches: int,
               num_ranks: int) -> list[tuple[str, Plan]]:
        """The built-ins of the placement as a user gets them for these costs: tuned for them where
        the schedule takes costs (the zero-bubble family), else as drawn."""
        options: dict[str, Any] = {"virtual_stages": self.virtual_stages} if self.kind == "looped" else {}
        seeds = []
        for name in BUILT_INS[self.kind]:
            for tuning in ({"costs": costs, "comm": comm}, {}):
                try:
                    plan = get_schedule(name, **tuning, **options).plan(num_stages, num_microbatches, num_ranks)
                except TypeError:  # takes no costs: plan it as drawn
                    continue
                except ValueError:  # cannot tune for these costs (no W costs), or refuses the shape
                    continue
                seeds.append((name, plan))
                break
        return seeds

    def _warm_up(self, num_stages: int, num_microbatches: int, num_ranks: int) -> Plan | None:
        """The placement's 1F1B-family order, if it fits the memory cap, with the odd micro-batches'
        backwards split (W right after B) and the even ones' whole: one step measures both ways of
        running a backward on every stage (one micro-batch: whole only, nothing to split for)."""
        options = {"virtual_stages": self.virtual_stages} if self.kind == "looped" else {}
        rows = get_schedule(WARM_UP[self.kind], **options).plan(num_stages, num_microbatches, num_ranks)
        plan = [[a for a in defer_weight_passes([a for a in row if a.kind != "W"], 0)
                 if a.kind != "W" or a.microbatch % 2 == 1] for row in rows]
        if self.memory_limit is not None:
            caps = self.memory_limit if isinstance(self.memory_limit, tuple) else (self.memory_limit,) * num_ranks
            if len(caps) != num_ranks or any(peak_inflight(row) > cap for row, cap in zip(plan, caps)):
                return None  # synthesise for unit costs under the cap instead
        return plan

    # ------------------------------------------------------ measured costs

    def use_costs(self, costs: Mapping[tuple[str, int], float], comm: float = 0.0) -> bool:
        """Keep the latest measured costs; the warm-up plans are stale once the first arrive.

        Plans already synthesised stay (a plan that changes with every step's
        noise would be hard to reason about); a new micro-batch count is
        synthesised from the latest measurements, merged with what earlier
        steps measured that this one did not (:func:`merge_measured`).
        """
        if self.costs is not None:
            return False
        stages = 1 + max((s for _, s in costs), default=-1)
        try:
            check_costs(costs, stages)
        except ValueError:
            return False  # incomplete (a forward-only call): keep what we had
        first = self.measured is None
        self.measured = merge_measured(self.measured or {}, costs, stages)
        self.measured_comm = check_comm(comm)
        return first

    def describe_plan(self, num_microbatches: int) -> str:
        found = self.synthesis.get(num_microbatches)
        if num_microbatches in self.synthesis and found is None:
            return f"auto: warm-up ({WARM_UP[self.kind]}, every other backward split to measure B, W and whole)"
        if found is None:
            return "auto"
        source = "given" if self.costs is not None else "measured"
        versus = (f", best built-in {found.baseline} {found.baseline_makespan:.4g}"
                  if found.baseline is not None else ", no built-in fits the memory limit")
        others = ", ".join(f"{name} {'over the limit' if t is None else f'{t:.4g}'}"
                           for name, t in found.compared.items())
        split = sum(a.kind == "W" for row in found.plan for a in row)
        return (f"auto: synthesised for {source} costs ({found.method}; simulated {found.makespan:.4g}{versus}; "
                f"compared with {others or 'no built-in'} on the same costs, whole backwards priced at "
                f"{self.priced.get(num_microbatches, 'B')}; "
                f"{'no backward split' if not split else f'{split} backwards split'})")

    @staticmethod
    def _whole_price(costs: Any) -> str:
        """How the costs price an unsplit backward (see :mod:`pipesched.plan.costs`)."""
        if not isinstance(costs, Mapping):
            return "what the cost function says for B"
        if any(key[0] == FUSED for key in costs):
            return "their whole cost (BW)"
        return "B + W" if any(key[0] == "W" for key in costs) else "B"

