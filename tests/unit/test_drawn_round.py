"""A simulated leaf does the platform round it was drawn for and uploads into no other
(`drawn_round`), whatever its work dir held when its task started."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prefect_branchkey.flows.federation.simulation import SimulationError, drawn_round
from prefect_branchkey.flows.leaf.history import RoundRecord, append_record
from prefect_branchkey.flows.leaf.state import LeafState, save_state
from prefect_branchkey.flows.round import RoundResult

LEAF = "leaf-id"


def runs(*results: RoundResult) -> tuple[Callable[[], RoundResult], list[RoundResult]]:
    """A `run_round` stand-in answering `results` in turn, and the list of those it answered."""
    answered: list[RoundResult] = []
    pending: Iterator[RoundResult] = iter(results)

    def run() -> RoundResult:
        answered.append(next(pending))
        return answered[-1]

    return run, answered


def test_a_leaf_that_resyncs_up_to_its_drawn_round_then_does_it(tmp_path: Path) -> None:
    run, answered = runs(RoundResult("resynced", 1, 4), RoundResult("completed", 1, 4))
    assert drawn_round(run, tmp_path, LEAF, (1, 4)) == RoundResult("completed", 1, 4)
    assert len(answered) == 2


def test_a_leaf_that_finishes_an_earlier_round_left_unfinished_then_does_its_drawn_round(tmp_path: Path) -> None:
    run, answered = runs(RoundResult("completed", 1, 2), RoundResult("completed", 1, 4))
    assert drawn_round(run, tmp_path, LEAF, (1, 4)) == RoundResult("completed", 1, 4)
    assert len(answered) == 2


def test_a_leaf_that_finds_its_drawn_round_closed_fails_instead_of_joining_a_later_one(tmp_path: Path) -> None:
    run, answered = runs(RoundResult("resynced", 1, 5), RoundResult("completed", 1, 5))
    with pytest.raises(SimulationError, match=r"round 4 \(run 1\) closed without this leaf's update: the leaf is at "
                                              r"round 5"):
        drawn_round(run, tmp_path, LEAF, (1, 4))
    assert len(answered) == 1, "nothing was trained or uploaded for round 5"


def test_a_leaf_already_past_its_drawn_round_without_completing_it_fails(tmp_path: Path) -> None:
    save_state(tmp_path, LeafState(leaf_id=LEAF, run_number=1, round=5))
    run, answered = runs(RoundResult("completed", 1, 5))
    with pytest.raises(SimulationError, match=r"past round 4 \(run 1\) it was drawn for, which it did not complete"):
        drawn_round(run, tmp_path, LEAF, (1, 4))
    assert answered == []


def test_a_leaf_whose_platform_does_not_say_its_open_round_follows_the_platform(tmp_path: Path) -> None:
    run, answered = runs(RoundResult("resynced", 1, 7), RoundResult("completed", 1, 7))
    assert drawn_round(run, tmp_path, LEAF, None) == RoundResult("completed", 1, 7)
    assert len(answered) == 2


def test_a_leaf_that_sits_its_drawn_round_out_ends_declined(tmp_path: Path) -> None:
    run, _ = runs(RoundResult("declined", 1, 4))
    assert drawn_round(run, tmp_path, LEAF, (1, 4)).status == "declined"


def test_a_drawn_round_an_earlier_attempt_completed_is_returned_as_recorded(tmp_path: Path) -> None:
    save_state(tmp_path, LeafState(leaf_id=LEAF, run_number=1, round=5))
    append_record(tmp_path, RoundRecord("branch", LEAF, "leaf", 1, 4, "completed", eval_metrics={"accuracy": 0.5}))
    run, answered = runs(RoundResult("completed", 1, 5))
    assert drawn_round(run, tmp_path, LEAF, (1, 4)) == RoundResult("completed", 1, 4, eval_metrics={"accuracy": 0.5})
    assert answered == [], "the round is not run again"
