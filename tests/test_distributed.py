"""Multi-process pipelines on torch.distributed (gloo on 127.0.0.1), 2 and 4 real processes.

Every spawn runs under a deadline: a hang kills the processes and fails the
test instead of freezing the suite. The scenarios live in dist_scenarios.py
and compare against their own single-process references in float64.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import time
from pathlib import Path

import dist_scenarios
import pytest

from pipesched import Timeline

DEADLINE = 150.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, names: list[str], directory: Path, entry=None, deadline: float = DEADLINE) -> list[dict]:
    """Run ``entry`` (default: dist_scenarios.entry) in ``world`` processes; each rank's verdicts
    (a hang past ``deadline`` seconds fails)."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=entry or dist_scenarios.entry, args=(rank, world, port, names, str(directory)))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    limit, deadline = deadline, time.monotonic() + deadline
    try:
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
        assert not hung, f"ranks {hung} did not finish within {limit:.0f}s (hang)"
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    results = []
    for rank, process in enumerate(processes):
        path = directory / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} exited with {process.exitcode} and wrote no result"
        result = json.loads(path.read_text())
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
        results.append(result)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["2-processes", "4-processes"])
def world(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"world{request.param}")
    # stall last: it leaves a rank stuck
    names = ["gradients", "forward", "tuples", "tokens", "failure", "tied", "auto", "clip", "data_parallel",
             "pipeline_replicas", "scaler", "state_dict", "skips", "timeline", "shapes", "stall"]
    return request.param, run_world(request.param, names, directory), directory


def test_gradients_and_loss_equal_single_process(world):
    size, results, _ = world
    for rank, result in enumerate(results):
        for schedule in ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"]:  # zb-h1: split backwards (W)
            for shape, microbatches in [("11x4", 4), ("3x8", 3)]:
                verdict = result[f"{schedule}/{shape}"]
                assert verdict["ok"], f"rank {rank}, {schedule} {shape}: {verdict}"
                assert verdict["microbatches"] == microbatches
    # every rank returns the same loss; with gather_timeline the report holds every rank's
    # tasks, by default each rank's own (and every rank's memory figures either way)
    for key in results[0]:
        if "/" in key:
            assert len({r[key]["loss"] for r in results}) == 1
            stages = 2 * size if key.startswith("interleaved") else size
            kinds = 3 if key.startswith("zb-") else 2  # F, B (and W where split)
            for rank, result in enumerate(results):
                verdict = result[key]
                assert verdict["memory_ranks"] == size
                if verdict["gathered"]:
                    assert verdict["tasks"] == kinds * stages * verdict["microbatches"]
                    assert verdict["ranks_in_report"] == list(range(size))
                else:
                    assert verdict["tasks"] == kinds * stages // size * verdict["microbatches"]
                    assert verdict["ranks_in_report"] == [rank]


def test_tuple_activations_with_only_own_stages_built(world):
    _, results, _ = world
    for rank, result in enumerate(results):
        assert result["tuples"]["ok"], f"rank {rank}: {result['tuples']}"


def test_distributed_pipeline_has_forward_the_to_guard_device_checks_and_a_finalizer(world):
    """Regression: the multi-process pipeline had drifted from the single-process one."""
    _, results, _ = world
    for rank, result in enumerate(results):
        verdict = result["forward"]
        assert verdict["forward_ok"], f"rank {rank}: {verdict}"
        assert verdict["to"] and "places its stages on its devices itself" in verdict["to"]
        assert verdict["device"] and "device = 'cuda:7'" in verdict["device"] and "use 'cpu'" in verdict["device"]
        assert verdict["threads_before"] > 0 and verdict["threads_after"] == 0, f"rank {rank}: {verdict}"


def test_ignore_index_padding_weighted_by_tokens_across_processes(world):
    size, results, _ = world
    for rank, result in enumerate(results):
        for schedule in ["gpipe", "1f1b", "interleaved-1f1b"]:
            verdict = result[f"tokens:{schedule}"]
            assert verdict["ok"], f"rank {rank}, {schedule}: {verdict}"
    # a loss_normalizer failing on the last stage's rank fails the step on every rank
    broken = [r["tokens:broken"] for r in results]
    assert broken[-1] == {"raised": "RuntimeError", "message": "broken normaliser"}
    for verdict in broken[:-1]:
        assert verdict["raised"] == "RemoteStepError" and "RuntimeError: broken normaliser" in verdict["message"]


def test_mapping_activations_cross_processes_with_keys_and_type(world):
    _, results, _ = world
    for rank, result in enumerate(results):
        assert result["mappings"]["ok"], f"rank {rank}: {result['mappings']}"
    assert results[1]["mappings"]["seen"][0] == ["Features", ["hidden", "count"]]  # stage 1 is on rank 1


def test_skip_connections_cross_processes_straight_and_exactly(world):
    """Gradients equal the plain model's; each rank sends each skip tensor once, straight to the
    popping stage's rank (checkpointed forwards re-stash without re-sending); a dict of stages
    linked by skips is refused on every rank, before any collective."""
    size, results, _ = world
    for rank, result in enumerate(results):
        verdicts = {k: v for k, v in result.items() if k.startswith("skips:") and k != "skips:dict"}
        assert len(verdicts) == 2
        for key, verdict in verdicts.items():
            assert verdict["ok"], f"rank {rank}, {key}: {verdict}"
            assert verdict["skip_sends"] == verdict["expected_skip_sends"], (rank, key, verdict)
            assert verdict["peers"] == verdict["expected_peers"], (rank, key, verdict)
        assert "skip connections across processes need the full nn.Sequential" in result["skips:dict"] or (
            "pass the full nn.Sequential instead of a dict" in result["skips:dict"]), result["skips:dict"]
    assert sum(r[k]["skip_sends"] for r in results for k in r if k.startswith("skips:") and k != "skips:dict") > 0


def test_auto_learns_every_stages_costs_across_processes_and_every_rank_runs_one_synthesised_plan(world):
    """It used to run the warm-up plan forever: each process measured only its own stages, an
    incomplete table, so "auto" never synthesised. Now the end-of-step exchange carries every
    rank's medians and every rank merges the same table."""
    _, results, _ = world
    first = results[0]["auto"]
    stages = first["num_stages"]
    # F, split B and W, and the whole backward BW: the warm-up splits every other backward
    assert {(kind, stage) for kind, stage, _ in first["measured"]} == {
        (k, s) for k in ("F", "B", "W", "BW") for s in range(stages)}
    assert all(seconds > 0 for _, _, seconds in first["measured"])
    for rank, result in enumerate(results):
        auto = result["auto"]
        assert auto["measured"] == first["measured"], f"rank {rank} learned other costs"  # bitwise: one plan
        assert max(auto["grad_errors"]) < 1e-12, (rank, auto["grad_errors"])
        assert "warm-up" in auto["plans"][0], auto["plans"]
        assert "synthesised for measured costs" in auto["plans"][1] and auto["plans"][2] == auto["plans"][1]
        assert auto["ran"][1] == auto["synthesised_row"] and auto["ran"][2] == auto["ran"][1], (rank, auto)


def test_clip_grad_norm_uses_the_whole_models_norm_on_every_rank(world):
    """torch's clip_grad_norm_ on pipe.parameters() would clip each rank by its own norm; the pipeline's
    all-reduces it (a weight tied across processes counted once), for the 2-norm and the inf-norm."""
    _, results, _ = world
    for rank, result in enumerate(results):
        for norm in ("2.0", "inf"):
            verdict = result[f"clip:{norm}"]
            assert verdict["ok"], f"rank {rank}, norm {norm}: {verdict}"


def test_two_pipelines_with_data_parallel_groups_train_as_the_plain_model_on_the_whole_batch(world):
    """Pipelines could not be combined with data parallelism: DDP cannot wrap a pipeline's step, and
    averaging per-replica means is not the global mean when replicas count different tokens."""
    size, results, _ = world
    if size != 4:
        pytest.skip("two pipelines of two processes need a world of 4")
    for rank, result in enumerate(results):
        verdict = result["data_parallel"]
        assert verdict["ok"], f"rank {rank}: {verdict}"
        assert verdict["unchanged"] and verdict["next_loss_error"] < 1e-12, (rank, verdict)
    raised = [r["data_parallel"]["raised"] for r in results]
    assert raised[3].startswith("ValueError: targets hold 3 rows but inputs hold 8"), raised
    assert raised[2].startswith("RemoteStepError") and "targets hold 3 rows" in raised[2], raised
    for rank in (0, 1):
        assert "1 of the 2 data-parallel replicas failed this step" in raised[rank], raised


def test_single_process_pipelines_joined_by_data_parallel_group_train_as_the_plain_model(world):
    """One Pipeline per process (each pipelining over its own devices), data parallel across processes:
    the global batch's loss and gradients, the inputs' gradients weighted by each part's share."""
    size, results, _ = world
    for rank, result in enumerate(results):
        verdict = result["pipeline_replicas"]
        assert verdict["ok"], f"rank {rank}: {verdict}"
        assert verdict["buffers_equal"] and verdict["buffers_moved"], (rank, verdict)
        assert verdict["unchanged"] and verdict["next_loss_error"] < 1e-12, (rank, verdict)
    raised = [r["pipeline_replicas"]["raised"] for r in results]
    assert raised[0].startswith("ValueError: targets hold 2 rows but inputs hold 6"), raised
    for rank in range(1, size):
        assert f"1 of the {size} data-parallel replicas failed this step" in raised[rank], raised


def test_an_inf_gradient_on_one_rank_makes_every_processs_scaler_skip_the_step(world):
    """Each process's GradScaler sees only its own gradients: without sharing the verdict, the ranks
    without the inf would step while the last rank skipped, and the model would come apart."""
    _, results, _ = world
    for rank, result in enumerate(results):
        verdict = result["scaler"]
        assert verdict["ok"], f"rank {rank}: {verdict}"
        assert verdict["scales"][1][0] < verdict["scales"][0][0], verdict  # the armed step backed off


def test_exception_on_one_rank_surfaces_on_every_rank(world):
    _, results, _ = world
    failures = [r["failure"] for r in results]
    origin = [f for f in failures if f["holds_failing_layer"]]
    assert len(origin) == 1
    assert origin[0]["raised"] == "ValueError"
    assert "raised in forward F1.1 (stage 1, micro-batch 1)" in " ".join(origin[0]["notes"])
    for failure in failures:
        if failure is not origin[0]:
            assert failure["raised"] == "RemoteStepError"
            assert "ValueError: injected failure, raised in forward F1.1" in failure["message"]
        assert failure["next_step_grad_error"] < 1e-12  # the pipeline works again


def test_weights_tied_across_processes_train_exactly_under_every_schedule(world):
    """It used to be refused: each process trained its own copy. Now the holders sum their
    gradients after each backward, so after two SGD steps every copy equals the plain model's
    (every schedule on 2 processes, one per placement on 4)."""
    size, results, _ = world
    for rank, result in enumerate(results):
        for schedule, _ in dist_scenarios.tied_schedules(size):
            verdict = result[f"tied:{schedule}"]
            assert verdict["ok"], f"rank {rank}, {schedule}: {verdict}"
        buffer = result["tied:buffer"]
        assert buffer is not None and "buffer '0.running_mean' = " in buffer, f"rank {rank}: {buffer}"
        assert "forwards update buffers in place" in buffer
    # the embedding and the head live on different ranks under 1F1B: both hold a copy
    holders = [r["tied:1f1b"]["holds"]["embedding"] for r in results]
    assert holders == [True] + [False] * (size - 2) + [True]


def run_until_rank0_answers(scenario: str, directory: Path, deadline: float = 60.0) -> dict:
    """Two processes; rank 1 dies or freezes on purpose. Wait for rank 0 only, then kill rank 1."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=dist_scenarios.entry, args=(rank, 2, port, [scenario], str(directory)))
                 for rank in range(2)]
    for process in processes:
        process.start()
    try:
        processes[0].join(deadline)
        assert not processes[0].is_alive(), f"rank 0 did not finish within {deadline:.0f}s (hang)"
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)
    result = json.loads((directory / "rank0.json").read_text())
    assert "crash" not in result, f"rank 0 crashed:\n{result['crash']}"
    return result[scenario]


def test_peer_process_exiting_mid_step_raises_peer_lost_promptly(tmp_path):
    """A dead peer used to surface as a raw gloo error thrown while sending it error headers."""
    result = run_until_rank0_answers("peer_exits", tmp_path)
    assert result["raised"] == "PeerLost", result
    assert result["message"].startswith("lost rank 1: lost the connection to it"), result
    assert result["next"].startswith("this pipeline is unusable after losing a rank (lost rank 1"), result


def test_peer_frozen_while_this_rank_fails_ends_the_wait_at_stall_timeout(tmp_path):
    """Waiting for the messages a silent peer still owed used to take gloo's 30-minute timeout."""
    result = run_until_rank0_answers("peer_freezes", tmp_path)
    assert result["raised"] == "ValueError", result  # rank 0's own error comes first
    assert "injected failure" in result["message"]
    assert result["next"].startswith("this pipeline is unusable after losing a rank (lost rank 1: sent "
                                     "nothing for 2.0 s (stall_timeout)"), result


def test_distributed_state_dict_uses_the_model_keys_and_loads_the_full_model_state(world):
    """Keys used to be local_stages.<stage>.<layer>...: no checkpoint moved to or from the model."""
    _, results, _ = world
    verdicts = [r["state_dict"] for r in results]
    for rank, verdict in enumerate(verdicts):
        assert verdict["keys"] == verdict["own_keys"], f"rank {rank}: {verdict['keys']}"
        assert verdict["loaded"] and verdict["missing"] and verdict["unexpected"], f"rank {rank}: {verdict}"
        assert verdict["grad_error"] < 1e-12
    together = [k for v in verdicts for k in v["keys"]]
    assert sorted(together) == sorted(verdicts[0]["model_keys"])  # the parts make up the model, once


def test_watchdog_names_what_each_rank_waits_on(world):
    size, results, _ = world
    messages = [r["stall"] for r in results]
    assert all(m["raised"] == "StepStalled" for m in messages), messages
    assert "rank 1 is running F1.0" in messages[1]["message"]
    assert "rank 0 at B0.0 waits for B1.0" in messages[0]["message"]
    if size > 2:  # a rank downstream of the stuck one waits for its activation
        assert "rank 2 at F2.0 waits for F1.0" in messages[2]["message"]


def test_shapes_cross_once_per_micro_batch_shape_and_renegotiate_when_they_change(world):
    """Specs are sent for a new batch size or trailing shape only, cached for a shape seen before,
    and re-negotiated in place when a stage's output shape changes for the same input shape."""
    _, results, _ = world
    new_input = [True, False, True, False, True, True, False, False, False, False]
    changed_output = [False] * 7 + [True, False, True]
    for rank, result in enumerate(results):
        steps = result["shapes"]
        assert all(s["exact"] for s in steps), f"rank {rank}: {steps}"
        across = rank <= 1  # the ranks on either side of the boundary whose shape changes on its own
        respecs = [c and across for c in changed_output]
        assert [s["respecs"] > 0 for s in steps] == respecs, f"rank {rank}: {steps}"
        assert [s["specs"] > 0 for s in steps] == [n or r for n, r in zip(new_input, respecs)], f"rank {rank}: {steps}"


def test_per_rank_logs_merge_into_one_timeline(world):
    size, results, directory = world
    logs = sorted(directory.glob("timeline-rank*.jsonl"))
    assert len(logs) == size
    timeline = Timeline.from_jsonl(logs)
    assert len(timeline.tasks) == results[0]["timeline"]["tasks"] == 2 * size * 4
    assert {t.rank for t in timeline.tasks} == set(range(size))
    assert len(timeline.comm) == sum(r["timeline"]["comm"] for r in results) > 0
    # each process logged its rank's "memory" event: the merged timeline shows the report's peaks
    assert timeline.peak_activation_bytes == results[0]["timeline"]["peak_activation_bytes"]
    assert min(timeline.peak_activation_bytes) > 0
    trace = timeline.to_chrome_trace()
    comm_tracks = {e["tid"] for e in trace["traceEvents"] if e.get("cat") == "comm"}
    task_tracks = {e["tid"] for e in trace["traceEvents"] if e.get("cat") in ("forward", "backward")}
    assert comm_tracks and not comm_tracks & task_tracks
    # on rank 0's clock, no task starts before the producer of its input ended
    ends = {(t.kind, t.stage, t.microbatch): t.end for t in timeline.tasks}
    for t in timeline.tasks:
        if t.kind == "F" and t.stage > 0:
            assert t.start >= ends[("F", t.stage - 1, t.microbatch)] - 1e-3


def torchrun(*args: str, cwd: Path) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "pipesched", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=DEADLINE)


def test_torchrun_demo_writes_merged_outputs(tmp_path):
    result = torchrun("demo", "--steps", "4", "--batch", "16", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 CPU ranks (one process each)" in result.stdout
    assert result.stdout.count("pipesched demo:") == 1  # only rank 0 prints
    logs = sorted((tmp_path / "out").glob("timeline-rank*.jsonl"))
    assert [p.name for p in logs] == ["timeline-rank0.jsonl", "timeline-rank1.jsonl"]
    trace = json.loads((tmp_path / "out" / "trace.json").read_text())
    assert {e["tid"] for e in trace["traceEvents"] if e.get("cat") in ("forward", "backward")} == {0, 1}


def test_torchrun_compare_checks_gradients_across_processes(tmp_path):
    result = torchrun("compare", "--schedules", "gpipe,1f1b", "--steps", "1", "--warmup", "0",
                      "--batch", "16", "--chunks", "4", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    try:
        rows = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"stdout is not the JSON table:\n{result.stdout[-3000:]}") from None
    assert [r["schedule"] for r in rows] == ["gpipe", "1f1b"]
    assert all(r["grads_match"] and r["ranks"] == 2 for r in rows)
