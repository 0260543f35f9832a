#!/usr/bin/env python3
"""Draw the timeline of a real step under 1F1B and under ZB-H1, for the README and the docs.

    python scripts/timeline_gantt.py            # rewrites docs/img/timeline-1f1b.png and -zb-h1.png
    python scripts/timeline_gantt.py --out DIR  # somewhere else

Unlike ``scripts/schedule_charts.py`` (the simulator's placement of a plan), these are measured:
the task records of one ``pipe.step()`` (the second; the first warms up), drawn by
``Timeline.to_gantt_png``. The model is four sleep layers on four CPU ranks (``benchmarks/
sleep_layers.py``: F = B = W = 10 ms per micro-batch, sleeps that hold no core), so the bars show
the schedule and the engine, not this machine's arithmetic; 8 micro-batches. Run it on a quiet
machine: a busy one stretches bars. Needs matplotlib (``pipesched[plot]``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANKS, MICROBATCHES, TASK_MS = 4, 8, 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repository, not an installed package
    import torch
    from torch import nn

    from benchmarks.sleep_layers import sleep_model
    from pipesched import Pipeline
    from pipesched.observe.timeline import Timeline

    model = sleep_model([TASK_MS] * RANKS)
    x, y = torch.zeros(MICROBATCHES, 1), torch.zeros(MICROBATCHES, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    for schedule in ("1f1b", "zb-h1"):
        with Pipeline(copy.deepcopy(model), schedule=schedule, balance=[1] * RANKS, devices=["cpu"] * RANKS,
                      chunks=MICROBATCHES, checkpoint="never", loss_fn=nn.MSELoss()) as pipe:
            pipe.step(x, y)  # warm-up
            pipe.step(x, y)
            timeline = Timeline.from_report(pipe.last_report)
            path = timeline.to_gantt_png(
                args.out / f"timeline-{schedule}.png",
                title=f"{schedule}: {RANKS} CPU ranks, {MICROBATCHES} micro-batches, F = B = W = {TASK_MS:g} ms "
                      f"(measured)",
            )
            print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                  f"{timeline.makespan * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
