"""Skip connections in pipelines: exact gradients under every schedule and checkpoint policy,
tensors sent once straight between the two stages, nothing left after a step, and the
dependency edges in the plan layer (lowering, validation, simulator, wire tags)."""

from __future__ import annotations

import dataclasses
import gc
import threading
import weakref

import pytest
import torch
from conftest import assert_grads_equal, reference_grads
from skip_models import UNET_BALANCE, WIDTH, Down, Up, unet, unet_data
from torch import nn

from pipesched import (
    Pipeline,
    Schedule,
    StepStalled,
    is_checkpointing,
    is_recomputing,
    simulate,
)
from pipesched.distributed.wire import PARTS, message_tag
from pipesched.plan.action import Action
from pipesched.plan.lowering import (
    ACTIVATION,
    GRADIENT,
    SKIP,
    SKIP_GRADIENT,
    Lowering,
    SkipEdge,
    check_skips,
    inputs_of,
)
from pipesched.plan.registry import get_schedule, schedules_for
from pipesched.plan.replay import Deadlock
from pipesched.plan.schedule import validate_plan
from pipesched.runtime.skip.layout import inspect_skip_layout
from pipesched.runtime.skip.portal import StageTracker
from pipesched.runtime.transport import Transport
from pipesched.skip import Namespace, pop, skippable, stash

F = lambda s, m: Action("F", s, m)
B = lambda s, m: Action("B", s, m)
LOSS = nn.MSELoss()


def four_stage_schedules() -> list[tuple[str, int]]:
    """Every registered schedule, each with the rank count at which it cuts a model into 4 stages."""
    found = {}
    for ranks in (4, 2):
        for name, stages in schedules_for(ranks):
            if stages == 4:
                found.setdefault(name, ranks)
    return sorted(found.items())


SCHEDULES = four_stage_schedules()


def test_every_registered_schedule_is_covered():
    """Every registered schedule that fits 2 or 4 ranks runs the U-Net below: each built-in plug-in."""
    assert {"gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v", "interleaved-zb", "looped-bfs",
            "dualpipe-v"} <= {name for name, _ in SCHEDULES}


def test_the_reference_is_the_model_called_directly():
    """The un-pipelined reference below is the very nn.Sequential, skips and all."""
    model = unet()
    x, _ = unet_data()
    assert model(x).shape == (x.shape[0], WIDTH)


@pytest.mark.parametrize("schedule,ranks", SCHEDULES, ids=[name for name, _ in SCHEDULES])
def test_gradients_equal_the_unpipelined_model_under_every_policy(schedule, ranks):
    model = unet()
    x, y = unet_data(rows=7)
    ref_loss, ref = reference_grads(model, LOSS, x, y)
    policies = ["never", "always", "except_last", lambda stage, mb: (stage + mb) % 2 == 0]
    for policy in policies:
        model.zero_grad()
        with Pipeline(model, schedule=schedule, balance=UNET_BALANCE, devices=["cpu"] * ranks, chunks=3,
                      checkpoint=policy, loss_fn=LOSS, stall_timeout=60) as pipe:
            loss = pipe.step(x, y)
            assert pipe.last_report.held_activation_bytes == [0] * ranks
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        assert_grads_equal(model, ref)


def test_skip_edges_of_the_unet_cross_one_two_and_three_stages():
    model = unet()
    stages = Pipeline(model, balance=UNET_BALANCE, devices=["cpu"] * 4).stages
    layout = inspect_skip_layout(stages)
    assert [(e.src, e.dst, e.names) for e in layout.edges] == [
        (0, 2, ("skip",)), (0, 3, ("skip",)), (1, 2, ("skip",)), (2, 3, ("inp",)),
    ]
    assert {e.dst - e.src for e in layout.edges} == {1, 2, 3}
    assert layout.stages == {0, 1, 2, 3}
    within = [key for key, (src, dst) in layout.routes.items() if src == dst]
    assert len(within) == 1 and within[0][1] == "inp"  # stage 3 stashes and pops its own


def test_input_gradients_and_forward_half():
    """pipe(x) equals model(x); output.backward() through the pipeline equals the plain backward.

    Not bitwise: a micro-batch and the whole batch may take different CPU
    kernels, whose float64 sums differ in the last bits (5.6e-17 seen).
    """
    model = unet()
    x, _ = unet_data()
    with Pipeline(model, schedule="gpipe", balance=UNET_BALANCE, devices=["cpu"] * 4, chunks=3) as pipe:
        with torch.no_grad():
            torch.testing.assert_close(pipe(x), model(x), rtol=0, atol=1e-12)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(pipe(x), model(x), rtol=0, atol=1e-12)
        model.train()
        xp = x.clone().requires_grad_()
        (pipe(xp) ** 2).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        xr = x.clone().requires_grad_()
        (model(xr) ** 2).sum().backward()
    for got, want in zip(grads, model.parameters()):
        torch.testing.assert_close(got, want.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(xp.grad, xr.grad, rtol=0, atol=1e-12)


def test_dropout_in_a_stashed_tensor_replays_exactly():
    """A recompute stashes again the very tensor first sent: dropout masks match, whatever the policy."""
    model = unet(dropout=0.5)
    x, y = unet_data()
    results = {}
    for schedule, ranks in [("1f1b", 4), ("zb-v", 2)]:
        for policy in ["never", "always"]:
            model.zero_grad()
            with Pipeline(model, schedule=schedule, balance=UNET_BALANCE, devices=["cpu"] * ranks, chunks=3,
                          checkpoint=policy, loss_fn=LOSS) as pipe:
                torch.manual_seed(7)  # the step seed is one draw from the caller's generator
                loss = pipe.step(x, y)
            results[(schedule, policy)] = (loss, [p.grad.clone() for p in model.parameters()])
    first_loss, first_grads = results[("1f1b", "never")]
    for loss, grads in results.values():
        assert torch.equal(loss, first_loss)
        for got, want in zip(grads, first_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


class CountingTransport(Transport):
    """The real transport, counting what it is asked to send."""

    def __init__(self, transport: Transport):
        super().__init__(transport.devices, transport.compute_streams)
        self.sends: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def send(self, values, src, dst):
        with self.lock:
            self.sends.append((src, dst))
        return super().send(values, src, dst)


@pytest.mark.parametrize("schedule,ranks", [("1f1b", 4), ("zb-v", 2)])
def test_recompute_restashes_without_resending(schedule, ranks):
    """Each transfer of the lowering is sent exactly once, with every forward recomputed."""
    model = unet()
    x, y = unet_data(rows=6)
    seen: dict[str, list[int]] = {"first": [], "again": []}

    def record(module, inputs, output):
        phase = "again" if is_recomputing() else "first" if is_checkpointing() else None
        if phase:
            seen[phase].append(output.data_ptr())

    model[5].register_forward_hook(record)  # Up(ns1) on stage 2: pops what stage 1 sent
    with Pipeline(model, schedule=schedule, balance=UNET_BALANCE, devices=["cpu"] * ranks, chunks=3,
                  checkpoint="always", loss_fn=LOSS) as pipe:
        runner = pipe._runner
        counting = CountingTransport(runner.layout.transport)
        runner.layout = dataclasses.replace(runner.layout, transport=counting)
        pipe.step(x, y)
        _, lowering = runner.plan(3)
    skips = [t for t in lowering.transfers if t.carries in (SKIP, SKIP_GRADIENT)]
    assert len(skips) == 2 * 4 * 3  # 4 edges, there and back, 3 micro-batches
    assert len(counting.sends) == len(lowering.transfers)
    assert sorted(counting.sends) == sorted((t.src, t.dst) for t in lowering.transfers)
    assert len(seen["first"]) == len(seen["again"]) == 3


def test_the_popping_stage_recomputes_from_the_tensor_it_received():
    popped: dict[str, list[int]] = {"first": [], "again": []}

    @skippable(pop=["skip"])
    class Watch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            skip = yield pop("skip")
            if is_recomputing() or is_checkpointing():
                popped["again" if is_recomputing() else "first"].append(skip.data_ptr())
            return self.lin(x) + skip

    torch.manual_seed(0)
    model = nn.Sequential(Down(), nn.Linear(WIDTH, WIDTH), Watch()).double()
    x, y = unet_data()
    _, ref = reference_grads(model, LOSS, x, y)
    with Pipeline(model, schedule="1f1b", balance=[1, 1, 1], devices=["cpu"] * 3, chunks=2,
                  checkpoint="always", loss_fn=LOSS) as pipe:
        pipe.step(x, y)
        assert_grads_equal(model, ref)
        # a stage's first checkpointed run ever copies its inputs once, to learn whether it writes
        # into them (runtime/stage_input.py); from then on, a stage that does not reads them as received
        popped["first"].clear()
        popped["again"].clear()
        pipe.step(x, y)
    assert len(popped["first"]) == 2
    assert popped["first"] == popped["again"]  # the same received storage, read twice


@pytest.mark.parametrize("schedule,ranks", [("1f1b", 4), ("zb-h1", 4), ("zb-v", 2), ("dualpipe-v", 2)])
@pytest.mark.parametrize("policy", ["never", "always", "except_last"])
def test_no_skip_tensor_survives_a_step(schedule, ranks, policy):
    """Every stashed and every received skip tensor is gone once step() returns (weak references)."""
    refs: list[tuple[str, int, weakref.ref]] = []
    save, load = StageTracker.save, StageTracker.load

    def tracked_save(self, key, tensor):
        refs.append(("stashed", self.stage, weakref.ref(tensor)))
        save(self, key, tensor)

    def tracked_load(self, key):
        tensor = load(self, key)
        refs.append(("popped", self.stage, weakref.ref(tensor)))
        return tensor

    model = unet()
    x, y = unet_data()
    try:
        StageTracker.save, StageTracker.load = tracked_save, tracked_load
        with Pipeline(model, schedule=schedule, balance=UNET_BALANCE, devices=["cpu"] * ranks, chunks=3,
                      checkpoint=policy, loss_fn=LOSS) as pipe:
            pipe.step(x, y)
            alive = [(what, stage) for what, stage, ref in refs if ref() is not None]
            gc.collect()
            alive_after_gc = [(what, stage) for what, stage, ref in refs if ref() is not None]
    finally:
        StageTracker.save, StageTracker.load = save, load
    assert len(refs) >= 2 * 5 * 3  # five routes, stashed and popped, three micro-batches
    assert alive == [] and alive_after_gc == []


def test_a_stash_of_none_crosses_stages():
    @skippable(stash=["none"])
    class StashNone(nn.Module):
        def forward(self, x):
            yield stash("none", None)
            return x * 2

    @skippable(pop=["none"])
    class PopNone(nn.Module):
        def forward(self, x):
            got = yield pop("none")
            assert got is None
            return x

    model = nn.Sequential(StashNone(), nn.Linear(WIDTH, WIDTH), PopNone()).double()
    x, y = unet_data()
    _, ref = reference_grads(model, LOSS, x, y)
    for schedule in ["1f1b", "zb-h1"]:
        model.zero_grad()
        with Pipeline(model, schedule=schedule, balance=[1, 1, 1], devices=["cpu"] * 3, chunks=2,
                      loss_fn=LOSS) as pipe:
            pipe.step(x, y)
        assert_grads_equal(model, ref)


def test_a_pipeline_refuses_unmatched_skippables_before_running():
    with pytest.raises(TypeError, match="no module declared 'skip' as poppable but stashed"):
        Pipeline(nn.Sequential(Down(), nn.Linear(WIDTH, WIDTH)).double(), balance=[1, 1], devices=["cpu"] * 2)
    with pytest.raises(TypeError, match="'0' declared 'skip' as poppable but it was not stashed"):
        Pipeline(nn.Sequential(Up(), Down()).double(), balance=[1, 1], devices=["cpu"] * 2)


def test_errors_inside_a_skippable_stage_name_the_action():
    @skippable(pop=["skip"])
    class Forgets(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(Down(), Forgets()).double()
    x, y = unet_data()
    with Pipeline(model, balance=[1, 1], devices=["cpu"] * 2, loss_fn=LOSS) as pipe:
        with pytest.raises(RuntimeError, match="'skip' must be popped but have not") as info:
            pipe.step(x, y)
    assert any("F1.0" in note for note in info.value.__notes__)


def test_stall_diagnosis_names_the_skip_producer():
    release = threading.Event()

    @skippable(stash=["skip"])
    class Blocks(nn.Module):
        def forward(self, x):
            yield stash("skip", x)
            release.wait(10)
            return x

    model = nn.Sequential(Blocks(), nn.Linear(WIDTH, WIDTH), Up()).double()
    x, y = unet_data()
    with Pipeline(model, schedule="1f1b", balance=[1, 1, 1], devices=["cpu"] * 3, chunks=2, loss_fn=LOSS,
                  stall_timeout=0.3) as pipe:
        try:
            with pytest.raises(StepStalled) as info:
                pipe.step(x, y)
            assert "rank 2 at F2.0 waits for F1.0, F0.0" in str(info.value)
        finally:
            release.set()
        returned = threading.Event()
        pipe._orchestrator.workers[0].submit(returned.set)  # runs once the stuck task has returned
        assert returned.wait(60), "the stuck task did not return"
        pipe.step(x, y)  # and the pipeline runs again


# ---------------------------------------------------------------- the plan layer: one rule

SKIPS = (SkipEdge(0, 2, ("a",)), SkipEdge(1, 3, ("b", "c")))


def test_inputs_of_adds_the_skip_edges():
    assert [(e.producer, e.carries) for e in inputs_of(F(2, 1), 4, SKIPS)] == [(F(1, 1), ACTIVATION), (F(0, 1), SKIP)]
    assert [(e.producer, e.carries) for e in inputs_of(B(1, 0), 4, SKIPS)] == [
        (F(1, 0), "state"), (B(2, 0), GRADIENT), (B(3, 0), SKIP_GRADIENT)]
    assert inputs_of(F(2, 1), 4) == inputs_of(F(2, 1), 4, ())  # no skips: the rule as before
    assert inputs_of(B(0, 0), 4, SKIPS)[-1].skip == SkipEdge(0, 2, ("a",))


def test_lowering_sends_skips_straight_between_the_two_ranks():
    schedule = get_schedule("1f1b")
    plan = schedule.plan(4, 2, 4)
    lowering = Lowering(plan, 4, SKIPS)
    skip_in = [t for t in lowering.receives(F(3, 1)) if t.carries == SKIP]
    assert [(t.producer, t.src, t.dst) for t in skip_in] == [(F(1, 1), 1, 3)]
    back = [t for t in lowering.sends(B(3, 1)) if t.carries == SKIP_GRADIENT]
    assert [(t.consumer, t.src, t.dst) for t in back] == [(B(1, 1), 3, 1)]
    assert [t.carries for t in lowering.messages(0, 2)] == [SKIP, SKIP]  # nothing else goes 0 -> 2
    assert [t.carries for t in lowering.messages(2, 0)] == [SKIP_GRADIENT, SKIP_GRADIENT]
    assert lowering.dependencies(F(2, 0)) == (F(1, 0), F(0, 0))


def test_check_skips_refuses_bad_edges():
    assert check_skips([SkipEdge(1, 3), SkipEdge(0, 2)], 4) == (SkipEdge(0, 2), SkipEdge(1, 3))
    with pytest.raises(ValueError, match="0 <= src < dst < 4"):
        check_skips([SkipEdge(2, 2)], 4)
    with pytest.raises(ValueError, match="0 <= src < dst < 4"):
        check_skips([SkipEdge(1, 4)], 4)
    with pytest.raises(ValueError, match="two skip edges from stage 0 to stage 2"):
        check_skips([SkipEdge(0, 2, ("a",)), SkipEdge(0, 2, ("b",))], 4)
    with pytest.raises(ValueError, match="sequence of SkipEdge"):
        check_skips(SkipEdge(0, 1), 4)


def test_a_deadlocking_plan_is_refused_naming_the_skip_producer():
    """Skip edges follow the chain (F(a) precedes F(b-1)), so they never make a valid plan deadlock;
    a plan that deadlocks anyway is refused before running, and the skip edge is named."""
    plan = [[F(0, 0), B(0, 0)], [F(1, 0), B(1, 0)], [B(2, 0), F(2, 0)]]  # rank 2: B before its F
    with pytest.raises(ValueError, match="B2.0 comes before F2.0"):
        validate_plan(plan, 3, 1, 3, [0, 1, 2], skips=[SkipEdge(0, 2)])
    one_rank = [[F(0, 0), F(1, 0), B(1, 0), B(0, 0)], [F(2, 0), B(2, 0)]]
    swapped = [[F(0, 0), B(0, 0), F(1, 0), B(1, 0)], [F(2, 0), B(2, 0)]]
    validate_plan(one_rank, 3, 1, 2, [0, 0, 1], skips=[SkipEdge(0, 2)])
    with pytest.raises(Deadlock) as info:
        validate_plan(swapped, 3, 1, 2, [0, 0, 1], skips=[SkipEdge(0, 2)])
    assert "rank 0 at B0.0 waits for B1.0, B2.0" in str(info.value)  # B2.0: the skip's gradient


def test_a_schedule_refused_with_skips_is_refused_before_anything_runs():
    class Backwards(Schedule):
        name = "backwards"

        def placement(self, num_stages, num_ranks):
            return [0, 0, 1]

        def plan(self, num_stages, num_microbatches, num_ranks):
            return [[F(0, 0), B(0, 0), F(1, 0), B(1, 0)], [F(2, 0), B(2, 0)]]

    torch.manual_seed(0)
    model = nn.Sequential(Down(), nn.Linear(WIDTH, WIDTH), Up()).double()
    with pytest.raises(Deadlock, match="rank 0 at B0.0 waits for B1.0, B2.0"):
        Pipeline(model, schedule=Backwards(), balance=[1, 1, 1], devices=["cpu"] * 2)


def test_the_simulator_prices_skip_transfers_between_ranks():
    plan = get_schedule("gpipe").plan(3, 1, 3)
    # a free middle stage: F2.0 waits for the skip from F0.0 (on rank 0) rather than for F1.0
    costs = {("F", 0): 1.0, ("F", 1): 0.0, ("F", 2): 1.0, ("B", 0): 1.0, ("B", 1): 0.0, ("B", 2): 1.0}
    without = simulate(plan, costs, comm=5.0)
    with_skip = simulate(plan, costs, comm=5.0, skips=[SkipEdge(0, 2)])
    assert without.start[F(2, 0)] == 11.0  # 1 + 5 (to rank 1) + 0 + 5 (to rank 2)
    assert with_skip.start[F(2, 0)] == 11.0  # the skip arrives at 1 + 5: not later
    assert with_skip.start[B(0, 0)] == without.start[B(0, 0)]


def test_wire_tags_stay_distinct_with_skip_messages():
    """A skip message and its producer's ordinary output leave one action: on the wire each
    transfer of the lowering (skip ones included) has its own tags, in every step."""
    plan = get_schedule("1f1b").plan(4, 3, 4)
    lowering = Lowering(plan, 4, SKIPS)
    assert any(t.edge.skip is not None for t in lowering.transfers)
    for step in (0, 1):
        tags = [message_tag(step, index, part) for index in range(len(lowering.transfers)) for part in range(PARTS)]
        assert len(set(tags)) == len(tags)
    first = {message_tag(0, i, p) for i in range(len(lowering.transfers)) for p in range(PARTS)}
    second = {message_tag(1, i, p) for i in range(len(lowering.transfers)) for p in range(PARTS)}
    assert not first & second


def test_a_namespace_reused_in_several_pipelines_keeps_its_edges():
    """The same model (namespaces and all) cut twice gives the same edges: a layout is per pipeline."""
    ns = Namespace()
    torch.manual_seed(0)
    model = nn.Sequential(Down().isolate(ns), nn.Linear(WIDTH, WIDTH), Up().isolate(ns)).double()
    first = Pipeline(model, balance=[1, 1, 1], devices=["cpu"] * 3)
    second = Pipeline(model, balance=[2, 1], devices=["cpu"] * 2)
    assert [(e.src, e.dst) for e in first._runner.skips.edges] == [(0, 2)]
    assert [(e.src, e.dst) for e in second._runner.skips.edges] == [(0, 1)]
    first.close()
    second.close()
