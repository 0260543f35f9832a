"""The multi-node recipe, as documented: two ``torchrun`` launchers (two "nodes" of two processes) on this machine.

``examples/multinode_mesh.py`` under ``torchrun --nnodes=2 --node-rank=i
--nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT``:
pp across the nodes, FSDP2 within each, three AdamW steps whose loss and
full gradients equal the plain model's on the global batch (float64).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 300.0


def launch(node: int, port: int, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--max-restarts=0", str(ROOT / "examples" / "multinode_mesh.py"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_torchrun_launchers_pp_across_nodes_fsdp_within_exact_steps(tmp_path):
    port = free_port()
    launchers = [launch(node, port, tmp_path) for node in (0, 1)]
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=DEADLINE)[0])
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait(5)
    for node, (launcher, output) in enumerate(zip(launchers, outputs)):
        assert launcher.returncode == 0, f"node {node} launcher exited {launcher.returncode}:\n{output[-4000:]}"
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]
    # torchrun numbers processes node by node; the mesh puts pp across nodes and dp within a node
    assert [(r["node"], r["pp"], r["dp"]) for r in results] == [(0, 0, 0), (0, 0, 1), (1, 1, 0), (1, 1, 1)]
    for result in results:
        assert result["steps"] == 3 and result["worst"] <= 1e-12, result
    assert "step 2: loss" in outputs[0]
