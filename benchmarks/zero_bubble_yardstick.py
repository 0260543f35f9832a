"""Yardstick: the zero-bubble schedules against torch 2.13's own orders, in the simulator.

``python -m benchmarks.zero_bubble_yardstick [--quick] [--json]``

torch.distributed.pipelining builds each schedule's per-rank order
(``pipeline_order``) in its constructor, from the stage objects' sizes alone;
no process group is needed to read it. This script builds them with stand-in
stage objects, turns torch's actions into pipesched actions (``F`` → F, ``I``
→ B with a W later, ``B`` → B unsplit, ``W`` → W, an overlapped ``F;B`` pair
→ the F then the B) and replays both torch's plan and ours in
:func:`pipesched.simulate` with the same costs:

* **equal** costs, F = B = W = 1 (an unsplit backward costs B + W = 2), no
  link latency, for every shape torch builds: p = 2, 4, 8; m = p .. 8p;
  v = 2, 3, 4 stages per rank where the schedule loops. Ours must be at least
  as fast, with no rank holding more micro-batches in flight than torch's.
* where torch's order is off the bound: ZB-V and DualPipeV with m < 2p (torch
  pads ZB-V to 2p - 1 virtual micro-batches, and refuses DualPipeV), a
  **heavy last stage** (F, B, W of the last stage cost 2: a language model's
  head and loss) and **link latency** (0.5 of a forward on every hop between
  ranks). Ours is given the costs (``costs=`` / ``comm=``) it is tuned for.

``bound`` is :func:`pipesched.plan.greedy.span_bound`: what no order of the
same work on the same ranks can beat. torch's counterpart of ``zb-h1`` is
``ScheduleInterleavedZeroBubble`` with one stage per rank (its ZB-H1 order).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from pipesched import Action, get_schedule, validate_plan
from pipesched.plan.greedy import span_bound, unit_costs
from pipesched.plan.simulate import simulate

#: our name -> (torch class name, stages per rank: fixed, or None for "v")
TORCH_COUNTERPART = {
    "zb-h1": ("ScheduleInterleavedZeroBubble", 1),
    "zb-v": ("ScheduleZBVZeroBubble", 2),
    "interleaved-zb": ("ScheduleInterleavedZeroBubble", None),
    "looped-bfs": ("ScheduleLoopedBFS", None),
    "dualpipe-v": ("ScheduleDualPipeV", 2),
}
LOOPED = ("interleaved-zb", "looped-bfs")
_TORCH_KIND = {"F": "F", "I": "B", "B": "B", "W": "W"}


class TorchRefuses(ValueError):
    """torch's constructor refuses the shape (e.g. DualPipeV with m < 2p)."""


def torch_plan(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int) -> list[list[Action]]:
    """torch 2.13's order for the same schedule and shape, as a pipesched plan."""
    import torch
    from torch.distributed.pipelining import schedules

    logging.getLogger("torch.distributed.pipelining").setLevel(logging.ERROR)
    cls = getattr(schedules, TORCH_COUNTERPART[name][0])
    p, v = num_ranks, virtual_stages
    # Only what the constructors read: sizes, a rank, and a module for the torch.compile check.
    stand_ins = [
        types.SimpleNamespace(
            num_stages=p * v, group_size=p, group_rank=0, stage_index=i * p, is_first=i == 0,
            is_last=False, submod=torch.nn.Identity(), stage_index_to_group_rank=None,
        )
        for i in range(v)
    ]
    try:
        built = cls(stand_ins, num_microbatches)
    except ValueError as error:
        raise TorchRefuses(str(error)) from None
    plan = []
    for rank in range(p):
        row = []
        for action in built.pipeline_order[rank]:
            if action is None:
                continue
            for part in action.sub_actions or (action,):
                kind = _TORCH_KIND[part.computation_type.value]
                row.append(Action(kind, part.stage_index, part.microbatch_index))  # type: ignore[arg-type]
        plan.append(row)
    return plan


@dataclass(frozen=True)
class Row:
    schedule: str
    scenario: str
    p: int
    v: int
    m: int
    torch: float | None  # None: torch refuses the shape
    ours: float
    bound: float
    torch_peak: list[int] | None
    ours_peak: list[int]

    @property
    def faster(self) -> bool:
        return self.torch is not None and self.ours < self.torch - 1e-9

    @property
    def ok(self) -> bool:
        """As fast as torch, holding no more in flight on any rank (trivially so where torch refuses)."""
        if self.torch is None or self.torch_peak is None:
            return True
        return self.ours <= self.torch + 1e-9 and all(o <= t for o, t in zip(self.ours_peak, self.torch_peak))


SCENARIOS = {
    "equal": "F = B = W = 1",
    "heavy-last": "F = B = W = 1, last stage 2",
    "comm": "F = B = W = 1, 0.5 per hop",
}


def scenario_costs(scenario: str, num_stages: int) -> tuple[dict[tuple[str, int], float], float]:
    costs = unit_costs(num_stages)
    if scenario == "heavy-last":
        costs.update({(kind, num_stages - 1): 2.0 for kind in "FBW"})
    return costs, (0.5 if scenario == "comm" else 0.0)


def compare(name: str, p: int, m: int, v: int, scenario: str = "equal") -> Row:
    """Simulate torch's order and ours for one shape under one scenario's costs."""
    stages = p * v
    costs, comm = scenario_costs(scenario, stages)
    options: dict[str, object] = {"virtual_stages": v} if name in LOOPED else {}
    if scenario != "equal" and name != "looped-bfs" and name != "dualpipe-v":
        options.update(costs=costs, comm=comm)  # tell ours what it runs on
    schedule = get_schedule(name, **options)
    placement = schedule.placement(stages, p)
    ours = validate_plan(schedule.plan(stages, m, p), stages, m, p, placement)
    mine = simulate(ours, costs, comm=comm, num_stages=stages)
    try:
        theirs = validate_plan(torch_plan(name, p, m, v), stages, m, p, placement)
        other = simulate(theirs, costs, comm=comm, num_stages=stages)
        torch_makespan, torch_peak = other.makespan, list(other.peak_inflight)
    except TorchRefuses:
        torch_makespan, torch_peak = None, None
    return Row(name, scenario, p, v, m, torch_makespan, mine.makespan,
               span_bound(ours, stages, costs, comm), torch_peak, list(mine.peak_inflight))


def shapes(name: str, quick: bool = False) -> Iterator[tuple[int, int, int]]:
    """(p, m, v) of every shape torch builds for ``name`` (p = 2, 4, 8; m = p..8p; v = 2..4 if looped)."""
    fixed = TORCH_COUNTERPART[name][1]
    for p in (2, 4) if quick else (2, 4, 8):
        for v in (fixed,) if fixed else ((2, 3) if quick else (2, 3, 4)):
            for m in range(p, (4 if quick else 8) * p + 1):
                yield p, m, v


def equal_cost_rows(quick: bool = False) -> list[Row]:
    rows = []
    for name in TORCH_COUNTERPART:
        for p, m, v in shapes(name, quick):
            try:
                rows.append(compare(name, p, m, v))
            except TorchRefuses:  # pragma: no cover - compare() records refusals itself
                continue
    return rows


def off_bound_rows(quick: bool = False) -> list[Row]:
    """Shapes and costs away from F = B = W with m >= 2p, where torch's order may be off the bound."""
    rows = []
    ranks = (4,) if quick else (4, 8)
    for name in ("zb-v", "dualpipe-v"):
        for p in ranks:
            for m in sorted({1, p // 2, p, 2 * p - 1}):
                rows.append(compare(name, p, m, 2))
    for scenario in ("heavy-last", "comm"):
        for name, v in (("zb-h1", 1), ("zb-v", 2), ("interleaved-zb", 2)):
            for p in ranks:
                for m in (p, 2 * p, 4 * p):
                    rows.append(compare(name, p, m, v, scenario))
    return rows


def summarize(rows: Iterable[Row]) -> list[dict[str, object]]:
    """Per schedule: shapes compared, how many ours is faster on, and any row that fails the yardstick."""
    out: dict[str, dict[str, object]] = {}
    for row in rows:
        entry = out.setdefault(row.schedule, {"schedule": row.schedule, "shapes": 0, "faster": 0, "failing": []})
        entry["shapes"] = int(entry["shapes"]) + 1  # type: ignore[arg-type]
        entry["faster"] = int(entry["faster"]) + row.faster  # type: ignore[arg-type]
        if not row.ok:
            entry["failing"].append(asdict(row))  # type: ignore[union-attr]
    return list(out.values())


def _fmt(value: float | None) -> str:
    return "refused" if value is None else f"{value:g}"


def format_rows(rows: Iterable[Row]) -> str:
    header = ["schedule", "costs", "p", "v", "m", "torch", "ours", "bound", "peak torch", "peak ours"]
    body = [
        [r.schedule, SCENARIOS[r.scenario], str(r.p), str(r.v), str(r.m), _fmt(r.torch), f"{r.ours:g}",
         f"{r.bound:g}", "-" if r.torch_peak is None else str(max(r.torch_peak)), str(max(r.ours_peak))]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="p = 2, 4; m up to 4p; v = 2, 3")
    parser.add_argument("--json", action="store_true", help="print every row as JSON")
    args = parser.parse_args(argv)
    equal = equal_cost_rows(args.quick)
    off = off_bound_rows(args.quick)
    if args.json:
        print(json.dumps({"equal": [asdict(r) for r in equal], "off_bound": [asdict(r) for r in off]}, indent=1))
    else:
        print("Equal costs (F = B = W = 1), every shape torch builds: ours vs torch's order")
        for entry in summarize(equal):
            failing = entry["failing"]
            print(f"  {entry['schedule']:<15} {entry['shapes']:>4} shapes, faster on {entry['faster']:>3}, "
                  f"{'all as fast with no more in flight' if not failing else f'{len(failing)} FAIL'}")  # type: ignore[arg-type]
        print()
        print("Off the papers' point (m < 2p, a heavy last stage, link latency), ours given the costs:")
        print(format_rows(off))
    failures = [r for r in equal + off if not r.ok]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
