"""What watching forwards for random draws costs: this checkout against a base commit, side by side.

Runs a small transformer pipeline (2 CPU ranks, 1f1b, 8 micro-batches, the
default checkpoint policy) in alternating child processes, one importing this
checkout's pipesched and one a ``git archive`` of ``--base``, and prints the
median wall time and process CPU time per step of each and their ratios (CPU
time is the steadier figure on a shared machine), for three stages:

* ``dropout=0``: ``nn.TransformerEncoderLayer`` in training. The base watched
  every forward with its tripwire; this checkout trusts the exact classes in a
  quiet state (dropout 0) and watches nothing.
* ``dropout=0, custom``: the same layers inside a module class of the user's
  own, so every forward of both stages is watched and never seeded: the worst
  case for the dispatch watcher.
* ``dropout=0.1``: the stages are learned to draw after their first forward
  and are seeded up front from then on.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/rng_watch_overhead.py --base a6c8dab
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


CONFIGS = {"dropout=0": (0.0, False), "dropout=0, custom": (0.0, True), "dropout=0.1": (0.1, False)}


def child(config: str, steps: int) -> None:
    import torch
    from torch import nn

    from pipesched import Pipeline

    class Block(nn.Module):
        def __init__(self, layer: nn.Module):
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    dropout, custom = CONFIGS[config]
    torch.manual_seed(0)
    layers = [nn.TransformerEncoderLayer(64, 4, 256, dropout=dropout, batch_first=True) for _ in range(4)]
    model = nn.Sequential(*[Block(layer) if custom else layer for layer in layers])
    x, y = torch.randn(64, 32, 64), torch.randn(64, 32, 64)
    times = []
    with Pipeline(model, schedule="1f1b", balance=[2, 2], devices=["cpu", "cpu"], chunks=8,
                  loss_fn=nn.MSELoss()) as pipe:
        for _ in range(3):
            pipe.step(x, y)
        cpu = time.process_time()
        for _ in range(steps):
            start = time.perf_counter()
            pipe.step(x, y)
            times.append(time.perf_counter() - start)
        cpu = time.process_time() - cpu
    print(json.dumps({"step_ms": statistics.median(times) * 1e3, "cpu_ms": cpu / steps * 1e3}))


def forward_costs(base_dir: str, repeats: int) -> None:
    """One stage's forward (2 encoder layers, dropout=0, one 8-row micro-batch, grad on) in this
    process: plain, under the base's tripwire, under this checkout's watcher and backstop reads."""
    import importlib.util

    import torch
    from torch import nn

    from pipesched.runtime.draw_detection import Watcher
    from pipesched.runtime.generators import Held, live_states

    spec = importlib.util.spec_from_file_location("base_rng", Path(base_dir) / "pipesched/runtime/rng.py")
    base_rng = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(base_rng)  # type: ignore[union-attr]
    torch.manual_seed(0)
    stage = nn.Sequential(*[nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True) for _ in range(2)])
    x = torch.randn(8, 32, 64)
    cpu = torch.device("cpu")

    def plain() -> None:
        stage(x)

    def tripwire() -> None:
        wire = base_rng._Tripwire(cpu, 1)
        with wire:
            stage(x)
        wire.release()

    def watcher() -> None:
        before = live_states(cpu)
        watch = Watcher(Held(cpu, 1))
        with watch:
            stage(x)
        watch.release()
        assert live_states(cpu) == before

    def backstop_reads() -> None:
        live_states(cpu)

    kinds = {"plain": plain, "base tripwire": tripwire, "this watcher+backstop": watcher}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for name, fn in kinds.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(1000):
        backstop_reads()
    read_us = (time.perf_counter() - start) * 1e3
    plain_ms = statistics.median(times["plain"]) * 1e3
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"forward, {name}: {ms:.3f} ms (x{ms / plain_ms:.3f} of plain)")
    print(f"one backstop read of the CPU generator's live state (get_state + bytes): {read_us:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="a6c8dab")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", choices=list(CONFIGS), default=None)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.steps)
    with tempfile.TemporaryDirectory() as base_dir:
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, check=True, capture_output=True).stdout
        with tempfile.TemporaryFile() as f:
            f.write(archive)
            f.seek(0)
            tarfile.open(fileobj=f).extractall(base_dir, filter="data")
        forward_costs(base_dir, args.rounds * 40)
        trees = {"base": base_dir, "this": str(ROOT)}
        for config in CONFIGS:
            ms: dict[str, dict[str, list[float]]] = {name: {"step_ms": [], "cpu_ms": []} for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
                    out = subprocess.run([sys.executable, __file__, "--child", config, "--steps", str(args.steps)],
                                         env=env, check=True, capture_output=True, text=True).stdout
                    for key, value in json.loads(out.splitlines()[-1]).items():
                        ms[name][key].append(value)
            for key, what in (("step_ms", "wall ms/step"), ("cpu_ms", "process CPU ms/step")):
                base, this = statistics.median(ms["base"][key]), statistics.median(ms["this"][key])
                print(f"{config}: {what}: base {args.base} {base:.1f}, this checkout {this:.1f}, "
                      f"ratio {this / base:.3f}  (rounds: base {[round(v, 1) for v in ms['base'][key]]}, "
                      f"this {[round(v, 1) for v in ms['this'][key]]})")


if __name__ == "__main__":
    main()
