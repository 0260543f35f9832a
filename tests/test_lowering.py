"""The plan lowering: every transfer of a plan, checked against properties derived by hand."""

from __future__ import annotations

import pytest

from pipesched import get_schedule
from pipesched.plan.lowering import ACTIVATION, GRADIENT, Lowering

SHAPES = [("gpipe", 4, 4, 3), ("1f1b", 4, 4, 7), ("interleaved", 8, 4, 5), ("interleaved", 6, 2, 1),
          ("1f1b", 1, 1, 3)]


def lowered(name, stages, ranks, microbatches):
    schedule = get_schedule(name)
    plan = schedule.plan(stages, microbatches, ranks)
    return plan, schedule.placement(stages, ranks), Lowering(plan, stages)


@pytest.mark.parametrize("name,stages,ranks,microbatches", SHAPES)
def test_every_stage_boundary_carries_one_activation_and_one_gradient_per_microbatch(
        name, stages, ranks, microbatches):
    plan, placement, lowering = lowered(name, stages, ranks, microbatches)
    expected = {(ACTIVATION, s, s + 1, m) for s in range(stages - 1) for m in range(microbatches)}
    expected |= {(GRADIENT, s + 1, s, m) for s in range(stages - 1) for m in range(microbatches)}
    got = [(t.carries, t.producer.stage, t.consumer.stage, t.producer.microbatch) for t in lowering.transfers]
    assert sorted(got) == sorted(expected)
    for t in lowering.transfers:
        assert (t.src, t.dst) == (placement[t.producer.stage], placement[t.consumer.stage])
        assert t.producer.microbatch == t.consumer.microbatch


@pytest.mark.parametrize("name,stages,ranks,microbatches", SHAPES)
def test_messages_between_two_ranks_follow_the_producers_order(name, stages, ranks, microbatches):
    plan, _, lowering = lowered(name, stages, ranks, microbatches)
    crossing = 0
    for src in range(ranks):
        position = {action: i for i, action in enumerate(plan[src])}
        for dst in range(ranks):
            if src == dst:
                continue
            messages = lowering.messages(src, dst)
            crossing += len(messages)
            assert all(t.src == src and t.dst == dst for t in messages)
            assert [position[t.producer] for t in messages] == sorted(position[t.producer] for t in messages)
    assert crossing == sum(t.src != t.dst for t in lowering.transfers)


@pytest.mark.parametrize("name,stages,ranks,microbatches", SHAPES)
def test_each_action_receives_what_the_rule_says(name, stages, ranks, microbatches):
    plan, _, lowering = lowered(name, stages, ranks, microbatches)
    for actions in plan:
        for action in actions:
            got = {(t.producer.kind, t.producer.stage) for t in lowering.receives(action)}
            s = action.stage
            if action.kind == "F":
                assert got == ({("F", s - 1)} if s > 0 else set())
            else:
                assert got == ({("B", s + 1)} if s < stages - 1 else set())
            for t in lowering.sends(action):
                assert t.producer == action


def test_a_plan_missing_a_producer_is_named():
    from pipesched import Action

    plan = [[Action("F", 1, 0), Action("B", 1, 0)]]
    with pytest.raises(KeyError, match="F1.0 needs F0.0"):
        Lowering(plan, 2)
