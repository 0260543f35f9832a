"""Exact balancing (pipesched.plan.balance) against brute force: every cut of small random cases."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from pipesched.plan.balance import balance_ranks, balance_stages, stage_sums


def all_cuts(n: int, k: int):
    """Every balance (layers per stage, each >= 1) of n layers into k stages."""
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def brute_stages(costs, k):
    return min(max(stage_sums(costs, b)) for b in all_cuts(len(costs), k))


def brute_ranks(costs, placement):
    ranks = max(placement) + 1

    def worst(balance):
        loads = [0.0] * ranks
        for stage, cost in enumerate(stage_sums(costs, balance)):
            loads[placement[stage]] += cost
        return max(loads)

    return min(worst(b) for b in all_cuts(len(costs), len(placement)))


def looped(stages, ranks):
    return [s % ranks for s in range(stages)]


def v_shape(ranks):
    return list(range(ranks)) + list(reversed(range(ranks)))


@pytest.mark.parametrize("seed", range(40))
def test_contiguous_balance_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 11)
    k = rng.randint(1, n)
    integer = seed % 2 == 0  # integers: sums are exact, so the comparison is too
    costs = [rng.randint(0, 20) if integer else rng.random() * 10 for _ in range(n)]
    result = balance_stages(costs, k)
    assert sum(result.balance) == n and len(result.balance) == k and min(result.balance) >= 1
    assert result.bottleneck == max(stage_sums(costs, result.balance))
    assert math.isclose(result.bottleneck, brute_stages(costs, k), rel_tol=1e-12, abs_tol=1e-12)


def test_the_heuristic_torchgpipe_used_can_miss_what_this_finds():
    """A heavy head: the optimum isolates it, whatever the even split says."""
    costs = [1, 1, 1, 1, 1, 1, 1, 10]
    assert balance_stages(costs, 2).balance == [7, 1]
    assert balance_stages(costs, 3).balance == [4, 3, 1]  # 4 / 3 / 10: the tie-break evens the rest
    assert balance_stages([1, 2, 3, 4, 5, 6], 2).balance == [4, 2]  # torchgpipe's own case
    # torchgpipe's blockpartition.solve cuts this one [1, 1, 2, 2] (largest stage 12); the optimum is 11
    assert balance_stages([4, 7, 1, 9, 4, 8], 4).bottleneck == 11


def test_ties_go_to_the_evenest_cut():
    # bottleneck 10 is forced by the last layer; among the cuts under it, [3, 3, 1] has the least squares
    assert balance_stages([1, 1, 1, 1, 1, 1, 10], 3).balance == [3, 3, 1]
    assert balance_stages([0, 0, 0, 0], 2).balance == [2, 2]


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("shape", ["looped", "v"])
def test_placement_aware_balance_equals_brute_force(seed, shape):
    rng = random.Random(1000 + seed)
    ranks = rng.randint(2, 3)
    placement = looped(2 * ranks, ranks) if shape == "looped" else v_shape(ranks)
    n = rng.randint(len(placement), 11)
    costs = [rng.randint(0, 20) if seed % 2 else rng.random() * 10 for _ in range(n)]
    result = balance_ranks(costs, placement)
    assert result.exact
    assert len(result.balance) == len(placement) and sum(result.balance) == n and min(result.balance) >= 1
    assert math.isclose(result.bottleneck, brute_ranks(costs, placement), rel_tol=1e-12, abs_tol=1e-12)
    loads = [0.0] * ranks
    for stage, cost in enumerate(result.stage_costs):
        loads[placement[stage]] += cost
    assert result.rank_costs == pytest.approx(loads)


def test_placement_aware_beats_the_placement_blind_cut():
    """V placement: rank 0 holds the first and the last stage, so with a heavy first layer its last stage is tiny."""
    costs = [8, 1, 1, 1, 1, 1, 1, 1]
    placement = v_shape(2)  # stages 0, 3 on rank 0; stages 1, 2 on rank 1
    blind = balance_stages(costs, 4)
    loads = [0.0, 0.0]
    for stage, cost in enumerate(blind.stage_costs):
        loads[placement[stage]] += cost
    aware = balance_ranks(costs, placement)
    assert aware.bottleneck == brute_ranks(costs, placement) == 9
    assert aware.balance[3] == 1
    assert aware.bottleneck < max(loads)


def test_one_stage_per_rank_is_the_contiguous_problem():
    costs = [3, 1, 4, 1, 5, 9, 2, 6]
    assert balance_ranks(costs, [0, 1, 2]).balance == balance_stages(costs, 3).balance
    assert balance_ranks(costs, [2, 0, 1]).rank_costs[2] == balance_stages(costs, 3).stage_costs[0]


def test_a_large_input_stops_at_the_node_limit_with_a_valid_cut():
    rng = random.Random(7)
    costs = [rng.random() for _ in range(200)]
    placement = looped(16, 4)
    result = balance_ranks(costs, placement, node_limit=500)
    assert not result.exact
    assert sum(result.balance) == 200 and len(result.balance) == 16 and min(result.balance) >= 1
    blind = balance_stages(costs, 16)
    loads = [0.0] * 4
    for stage, cost in enumerate(blind.stage_costs):
        loads[placement[stage]] += cost
    assert result.bottleneck <= max(loads) + 1e-12  # never worse than the incumbent it started from


@pytest.mark.parametrize(
    "costs, stages, message",
    [
        ([1, 2], 3, "cannot cut 2 layers into 3"),
        ([1, -1], 1, r"costs\[1\] = -1"),
        ([1, float("nan")], 1, r"costs\[1\]"),
        ("12", 1, "list of per-layer costs"),
        ([1, 2], 0, "stages must be an int >= 1"),
    ],
)
def test_bad_input_is_refused_with_the_fix(costs, stages, message):
    with pytest.raises(ValueError, match=message):
        balance_stages(costs, stages)


def test_a_placement_with_a_missing_rank_is_refused():
    with pytest.raises(ValueError, match="ranks 0..R-1"):
        balance_ranks([1, 2, 3], [0, 2, 0])
