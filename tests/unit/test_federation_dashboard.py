"""The deployed federation's dashboard, built from the leaves' round events: each report counted
once, the latest one for a round wins, and a leaf that did not report the latest round is shown
missing, never with an older value; a triggered run watches its window and no longer."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prefect.events.schemas.events import ReceivedEvent

from prefect_branchkey.flows.federation.dashboard import collect_reports, watch_deadline
from prefect_branchkey.flows.publishing.observability import federation_summary, federation_table

START = datetime(2026, 12, 1, tzinfo=UTC)
BRANCH = "b0d6c6a4-5d7e-4b53-9d3c-2b2f3f0e9a11"


def event(leaf: str, round_number: int, accuracy: float, *, run_number: int = 1, minutes: int = 0,
          event_id: uuid.UUID | None = None, branch_name: str | None = "digits", received_minutes: int = 0,
          **payload: Any) -> ReceivedEvent:
    return ReceivedEvent(
        id=event_id or uuid.uuid4(), occurred=START + timedelta(minutes=minutes),
        received=START + timedelta(minutes=received_minutes),
        event="branchkey.round.completed",
        resource={"prefect.resource.id": f"branchkey.leaf.{leaf}-id", "prefect.resource.name": leaf,
                  "branchkey.branch-id": BRANCH},
        related=[{"prefect.resource.id": f"prefect.tag.branch:{branch_name or BRANCH}",
                  "prefect.resource.role": "tag"}],
        payload={"run_number": run_number, "round": round_number, "status": "completed",
                 "aggregation_id": f"agg-{run_number}-{round_number}", "eval_metrics": {"accuracy": accuracy},
                 "branch_name": branch_name, **payload})


def histories(*events: ReceivedEvent, leaves: tuple[str, ...] = ()) -> dict[str, list[dict[str, Any]]]:
    return collect_reports(events)[BRANCH].histories(leaves)


def test_each_leafs_rounds_become_its_history_in_round_order() -> None:
    rows = histories(event("leaf-1", 2, 0.8, minutes=2), event("leaf-1", 1, 0.7))["leaf-1"]
    assert [(r["round"], r["eval_metrics"]["accuracy"]) for r in rows] == [(1, 0.7), (2, 0.8)]


def test_an_event_id_counts_once() -> None:
    same = uuid.uuid4()
    reports = collect_reports([event("leaf-1", 1, 0.7, event_id=same), event("leaf-1", 1, 0.9, event_id=same)])
    assert reports[BRANCH].histories()["leaf-1"][0]["eval_metrics"] == {"accuracy": 0.7}


def test_the_latest_report_of_a_round_wins() -> None:
    rows = histories(event("leaf-1", 1, 0.9, minutes=5), event("leaf-1", 1, 0.7, minutes=1))["leaf-1"]
    assert [r["eval_metrics"]["accuracy"] for r in rows] == [0.9]


def test_branch_is_named_by_its_payload_or_else_its_tag() -> None:
    assert collect_reports([event("leaf-1", 1, 0.7)])[BRANCH].name == "digits"
    assert collect_reports([event("leaf-1", 1, 0.7, branch_name=None)])[BRANCH].name == BRANCH


def test_event_without_a_round_is_ignored() -> None:
    broken = event("leaf-1", 1, 0.7)
    broken.payload.pop("round")
    assert collect_reports([broken]) == {}


def test_leaf_that_missed_the_latest_round_is_shown_missing_with_its_last_report() -> None:
    summary = federation_summary("Federation digits", histories(
        event("leaf-1", 1, 0.7), event("leaf-2", 1, 0.6), event("leaf-1", 2, 0.8, minutes=2)))
    assert "| leaf-1 | 0.8000 |" in summary
    assert "| leaf-2 | missing (last reported round 1 of run 1) |" in summary
    assert "0.6000 |" not in summary.split("| leaf-2 |")[1].split("|")[1]


def test_leaf_reporting_only_in_an_older_run_is_shown_missing() -> None:
    summary = federation_summary("Federation digits", histories(
        event("leaf-1", 1, 0.7, run_number=2, minutes=9), event("leaf-2", 4, 0.6, run_number=1)))
    assert "| leaf-2 | missing (last reported round 4 of run 1) |" in summary


def test_leaf_named_but_never_reported_is_missing_in_every_round() -> None:
    rows = histories(event("leaf-1", 1, 0.7), leaves=("leaf-1", "leaf-3"))
    assert federation_table(rows)[0]["missing"] == "leaf-3"
    assert "| leaf-3 | missing (no round reported) |" in federation_summary("Federation digits", rows)


def test_summary_shows_each_leafs_best_and_served_model() -> None:
    summary = federation_summary("Federation digits", histories(
        event("leaf-1", 2, 0.6, best_value=0.8, best_round=1, served=False)))
    assert "| 0.8000 (round 1) | round 1 (the best) |" in summary


def test_a_late_event_about_an_earlier_moment_is_news() -> None:
    """A leaf whose publication was deferred reports a round that ended before the last one shown:
    its event is received later, so the dashboard publishes again."""
    shown = collect_reports([event("leaf-1", 5, 0.7, minutes=10, received_minutes=10)])[BRANCH].newest
    late = event("leaf-2", 5, 0.6, minutes=9, received_minutes=30)
    assert collect_reports([event("leaf-1", 5, 0.7, minutes=10, received_minutes=10), late])[BRANCH].newest > shown


def test_a_triggered_run_watches_until_the_window_after_its_event_and_the_settle_time() -> None:
    deadline = watch_deadline(60, 5, "2026-12-02 19:03:18.515141+00:00")
    assert deadline == datetime(2026, 12, 2, 19, 4, 23, 515141, tzinfo=UTC)


def test_a_run_queued_past_its_window_does_not_watch() -> None:
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert watch_deadline(60, 5, hour_ago) < datetime.now(UTC)


def test_an_event_from_a_clock_ahead_watches_no_longer_than_its_window_from_now() -> None:
    hour_ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert watch_deadline(60, 5, hour_ahead) <= datetime.now(UTC) + timedelta(seconds=65)


def test_a_run_without_a_trigger_watches_from_now() -> None:
    before = datetime.now(UTC)
    assert before + timedelta(seconds=30) <= watch_deadline(30, 5, None) <= datetime.now(UTC) + timedelta(seconds=30)


def test_a_window_start_without_a_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="window_start must name its time zone"):
        watch_deadline(60, 5, "2026-12-02T19:03:18")


def test_a_negative_watch_is_refused() -> None:
    with pytest.raises(ValueError, match="watch_s must be a number of seconds >= 0, got -1"):
        watch_deadline(-1, 5, None)
