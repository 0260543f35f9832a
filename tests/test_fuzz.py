"""Property-based fuzzing of the whole engine against the un-pipelined model, in float64.

Default: a fixed, CI-sized set of examples (``derandomize``: every run tries the
same ones). ``PIPESCHED_FUZZ_EXAMPLES=N`` runs N fresh random examples per test.
"""

from __future__ import annotations

import copy
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipesched import Action, Pipeline, Schedule

_LONG = os.environ.get("PIPESCHED_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(_LONG) if _LONG else 30,
    derandomize=not _LONG,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def model_of(layers: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    if layers == 1:
        return nn.Sequential(nn.Linear(5, 3)).double()
    middle = [nn.Tanh() if i % 2 else nn.Linear(7, 7) for i in range(1, layers - 1)]
    return nn.Sequential(nn.Linear(5, 7), *middle, nn.Linear(7, 3)).double()


def check_against_reference(model, make_pipe, rows: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 5, dtype=torch.float64, generator=g)
    y = torch.randn(rows, 3, dtype=torch.float64, generator=g)
    reference = copy.deepcopy(model)
    ref_loss = nn.MSELoss()(reference(x), y)
    ref_loss.backward()
    with make_pipe(model) as pipe:
        loss = pipe.step(x, y)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=1e-10)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10)


@st.composite
def engine_configs(draw):
    schedule = draw(st.sampled_from(["gpipe", "1f1b", "interleaved-1f1b"]))
    if schedule == "interleaved-1f1b":
        ranks = draw(st.integers(1, 3))
        stages = ranks * draw(st.integers(2, 6 // ranks))
    else:
        stages = draw(st.integers(1, 6))
        ranks = stages
    layers = draw(st.integers(stages, stages + 3))
    cuts = sorted(draw(st.sets(st.integers(1, layers - 1), min_size=stages - 1, max_size=stages - 1))
                  if stages > 1 else [])
    balance = [b - a for a, b in zip([0, *cuts], [*cuts, layers])]
    checkpointed = draw(st.frozensets(st.tuples(st.integers(0, 5), st.integers(0, 15))))
    policy = draw(st.sampled_from(["always", "never", "except_last", "callable"]))
    return {
        "schedule": schedule,
        "ranks": ranks,
        "balance": balance,
        "chunks": draw(st.integers(1, 16)),
        "rows": draw(st.integers(1, 20)),
        "checkpoint": (lambda s, m: (s, m) in checkpointed) if policy == "callable" else policy,
        "seed": draw(st.integers(0, 2**16)),
    }


@FUZZ
@given(engine_configs())
def test_every_schedule_shape_and_policy_matches_the_reference(config):
    model = model_of(sum(config["balance"]), config["seed"])
    check_against_reference(
        model,
        lambda m: Pipeline(m, schedule=config["schedule"], balance=config["balance"],
                           devices=["cpu"] * config["ranks"], chunks=config["chunks"],
                           checkpoint=config["checkpoint"], loss_fn=nn.MSELoss()),
        config["rows"],
        config["seed"],
    )


# ------------------------------------------------------------------ custom plans


def all_actions(stages: int, microbatches: int) -> list[Action]:
    return [Action(k, s, m) for k in "FB" for s in range(stages) for m in range(microbatches)]


def needs(action: Action, stages: int) -> list[Action]:
    """The dependency rule, restated from its definition (independent of pipesched's)."""
    s, m = action.stage, action.microbatch
    if action.kind == "F":
        return [Action("F", s - 1, m)] if s else []
    return [Action("F", s, m)] + ([Action("B", s + 1, m)] if s + 1 < stages else [])


def oracle_runs(plan, stages, microbatches, placement) -> bool:
    """Naive execution: does every rank reach the end of its list? Quadratic, obviously right."""
    flat = [a for row in plan for a in row]
    if sorted(flat) != sorted(all_actions(stages, microbatches)):
        return False
    if any(placement[a.stage] != rank for rank, row in enumerate(plan) for a in row):
        return False
    done, heads, moved = set(), [0] * len(plan), True
    while moved:
        moved = False
        for rank, row in enumerate(plan):
            while heads[rank] < len(row) and all(d in done for d in needs(row[heads[rank]], stages)):
                done.add(row[heads[rank]])
                heads[rank] += 1
                moved = True
    return len(done) == len(flat)


@st.composite
def random_valid_plans(draw):
    """A random topological order of the whole dependency graph, split by rank."""
    stages = draw(st.integers(1, 5))
    ranks = draw(st.integers(1, stages))
    placement = draw(st.lists(st.integers(0, ranks - 1), min_size=stages, max_size=stages))
    microbatches = draw(st.integers(1, 6))
    rnd = draw(st.randoms(use_true_random=False))
    pending, done, order = set(all_actions(stages, microbatches)), set(), []
    while pending:
        ready = sorted(a for a in pending if all(d in done for d in needs(a, stages)))
        pick = rnd.choice(ready)
        pending.remove(pick)
        done.add(pick)
        order.append(pick)
    plan = [[a for a in order if placement[a.stage] == rank] for rank in range(ranks)]
    return stages, ranks, placement, microbatches, plan


class FixedPlan(Schedule):
    name = "fuzzed"

    def __init__(self, plan, placement):
        self._plan, self._placement = plan, placement

    def placement(self, num_stages, num_ranks):
        return list(self._placement)

    def plan(self, num_stages, num_microbatches, num_ranks):
        return [list(row) for row in self._plan]


@FUZZ
@given(random_valid_plans(), st.integers(0, 2**16))
def test_random_valid_plans_run_and_match(case, seed):
    stages, ranks, placement, microbatches, plan = case
    assert oracle_runs(plan, stages, microbatches, placement)
    model = model_of(stages + 1, seed)
    balance = [1] * (stages - 1) + [2]
    check_against_reference(
        model,
        lambda m: Pipeline(m, schedule=FixedPlan(plan, placement), balance=balance,
                           devices=["cpu"] * ranks, chunks=microbatches, loss_fn=nn.MSELoss()),
        rows=microbatches,
        seed=seed,
    )


@FUZZ
@given(random_valid_plans(), st.sampled_from(["swap", "move", "drop", "duplicate"]),
       st.randoms(use_true_random=False))
def test_broken_plans_are_refused_before_anything_runs(case, mutation, rnd):
    stages, ranks, placement, microbatches, plan = case
    plan = [list(row) for row in plan]
    rank = rnd.choice([r for r, row in enumerate(plan) if row])
    row = plan[rank]
    i, j = rnd.randrange(len(row)), rnd.randrange(len(row))
    if mutation == "swap":
        row[i], row[j] = row[j], row[i]
    elif mutation == "move":
        plan[rnd.randrange(ranks)].append(row.pop(i))
    elif mutation == "drop":
        row.pop(i)
    else:
        row.insert(j, row[i])
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x

    model = nn.Sequential(Spy(), *model_of(stages, 0))
    balance = [2] + [1] * (stages - 1)
    make = lambda: Pipeline(model, schedule=FixedPlan(plan, placement), balance=balance,  # noqa: E731
                            devices=["cpu"] * ranks, chunks=microbatches, loss_fn=nn.MSELoss())
    if oracle_runs(plan, stages, microbatches, placement):
        make().close()  # the mutation happened to keep the plan valid: it must be accepted
        return
    try:
        make().close()
    except ValueError:
        assert calls == []
    else:
        raise AssertionError(f"a broken plan was accepted: {plan}")
