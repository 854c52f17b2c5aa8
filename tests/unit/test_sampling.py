"""Client sampling: how many leaves a round draws, and which, reproducibly."""

from __future__ import annotations

import pytest

from prefect_branchkey.flows.federation.sampling import SamplingError, leaves_per_round, sampling_plan

LEAVES = [f"leaf-{i}" for i in range(100)]


def test_a_fraction_draws_that_share_of_the_leaves_rounded_up() -> None:
    assert leaves_per_round(100, 0.3) == 30
    assert leaves_per_round(10, 0.25) == 3
    assert leaves_per_round(3, 0.01) == 1


def test_the_same_seed_draws_the_same_leaves_each_round() -> None:
    first, again = sampling_plan(LEAVES, 0.3, seed=7), sampling_plan(LEAVES, 0.3, seed=7)
    assert [first.chosen(n) for n in range(1, 6)] == [again.chosen(n) for n in range(1, 6)]


def test_a_round_draws_its_leaves_whatever_rounds_came_before() -> None:
    plan = sampling_plan(LEAVES, 0.3, seed=7)
    later = plan.chosen(5)
    assert [plan.chosen(n) for n in range(1, 6)][-1] == later


def test_rounds_and_seeds_draw_different_leaves() -> None:
    plan = sampling_plan(LEAVES, 0.3, seed=7)
    assert plan.chosen(1) != plan.chosen(2)
    assert plan.chosen(1) != sampling_plan(LEAVES, 0.3, seed=8).chosen(1)


def test_each_round_draws_distinct_leaves_of_the_federation() -> None:
    chosen = sampling_plan(LEAVES, 0.3, seed=1).chosen(3)
    assert len(chosen) == len(set(chosen)) == 30 and set(chosen) <= set(LEAVES)


def test_a_full_fraction_draws_every_leaf() -> None:
    assert sampling_plan(LEAVES[:5], 1.0).chosen(4) == LEAVES[:5]


def test_a_count_draws_that_many_leaves() -> None:
    assert len(sampling_plan(LEAVES, count=12).chosen(1)) == 12


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan")])
def test_a_fraction_outside_zero_to_one_is_refused(fraction: float) -> None:
    with pytest.raises(SamplingError, match=r"fraction must be in \(0, 1\]"):
        leaves_per_round(100, fraction)


def test_more_leaves_per_round_than_credentials_are_refused() -> None:
    with pytest.raises(SamplingError, match="between 1 and the 100 leaves, got 101"):
        leaves_per_round(100, count=101)


def test_the_plan_records_each_rounds_leaves() -> None:
    plan = sampling_plan(LEAVES[:4], count=2, seed=3)
    table = plan.table(3)
    assert [row["round"] for row in table] == [1, 2, 3]
    assert table[1]["chosen"] == ", ".join(plan.chosen(2)) and table[1]["leaves"] == 2
