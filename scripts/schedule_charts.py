#!/usr/bin/env python3
"""Draw the built-in schedules' plans as SVG charts for the docs, from the plan layer.

    python scripts/schedule_charts.py            # rewrites docs/img/schedules/*.svg
    python scripts/schedule_charts.py --out DIR  # somewhere else

Each chart is :func:`pipesched.plan.chart.build_chart`'s plan, placed in time by the
simulator (what ``pipesched schedule show`` prints as text): 4 ranks, 8 micro-batches,
F = B = W per rank's worth of the model (a backward that is not split costs B + W), no
communication cost. Schedules with v stages per rank get stages of 1/v the cost, so the
total work is the same in every chart. Needs matplotlib (``pipesched[plot]``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANKS, MICROBATCHES = 4, 8
# name -> stages per rank (v)
SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2, "zb-h1": 1, "zb-v": 2}
COLOURS = {"F": "#4c78a8", "B": "#59a14f", "W": "#f28e2b"}


def draw(name: str, per_rank: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from pipesched.plan.chart import build_chart

    plt.rcParams["svg.fonttype"] = "none"  # text as text: small files, searchable labels
    plt.rcParams["svg.hashsalt"] = "pipesched"  # the same file for the same plan
    unit = 1.0 / per_rank
    chart = build_chart(name, RANKS * per_rank, MICROBATCHES, RANKS, forward_cost=unit, backward_cost=unit,
                        weight_cost=unit)
    sim = chart.sim
    fig, ax = plt.subplots(figsize=(10 + 3 * (per_rank - 1), 0.45 * RANKS + 1.1))
    for action, start in sim.start.items():
        rank, width = sim.rank_of[action], sim.end[action] - start
        ax.broken_barh([(start, width)], (rank - 0.4, 0.8), facecolors=COLOURS[action.kind], edgecolor="white",
                       linewidth=0.6)
        label = f"{action.microbatch}" if per_rank == 1 else f"{action.stage}.{action.microbatch}"
        ax.text(start + width / 2, rank, label, ha="center", va="center", fontsize=6 if per_rank > 1 else 7,
                color="white")
    ax.set_yticks(range(RANKS), [f"rank {r}" for r in range(RANKS)])
    ax.set_ylim(RANKS - 0.5, -0.5)
    ax.set_xlim(0, sim.makespan)
    ax.set_xlabel("time (F = B = W = 1 per rank's worth of the model)")
    bubble = sim.overall_bubble_over_total
    ax.set_title(f"{name}: {RANKS} ranks, {chart.num_stages} stages, {MICROBATCHES} micro-batches; "
                 f"makespan {sim.makespan:g}, bubble {bubble:.1%}", fontsize=9)
    kinds = sorted({a.kind for a in sim.start}, key="FBW".index)
    names = {"F": "forward", "B": "backward" if "W" not in kinds else "input-gradient backward (B)",
             "W": "weight-gradient pass (W)"}
    ax.legend(handles=[Patch(color=COLOURS[k], label=names[k]) for k in kinds], loc="upper center",
              bbox_to_anchor=(0.5, -0.32), ncol=3, fontsize=7, frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    path = out / f"{name}.svg"
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "schedules")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, per_rank in SCHEDULES.items():
        print(draw(name, per_rank, args.out))


if __name__ == "__main__":
    main()
