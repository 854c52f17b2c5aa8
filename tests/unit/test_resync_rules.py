"""The rules that keep a leaf in step with the platform, in-process: which notice answers an
upload, what the run details' extra fields mean, when a leaf is out of step, and what a
killed run leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from prefect_branchkey.bk_blocks import (
    AggregationRef,
    NotificationTimeout,
    OutOfSyncError,
    RunDetails,
    RunNotStartedError,
    RunStoppedError,
    StaleRoundError,
    UploadReply,
)
from prefect_branchkey.bk_blocks.client import BranchKeyClient
from prefect_branchkey.bk_blocks.notifications import NotificationListener
from prefect_branchkey.flows.leaf.history import RoundRecord, append_record, history_rows
from prefect_branchkey.flows.leaf.state import LeafState, hold_work_dir, load_state
from prefect_branchkey.flows.round import _check_in_step
from prefect_branchkey.tasks.aggregation import answer_from_run


def notice(aggregation_id: str, **extra: int) -> str:
    return json.dumps({"message_type": "aggregation_status", "body": {"aggregation_id": aggregation_id, **extra}})


def listener_with(*texts: str) -> NotificationListener:
    """A listener fed these notices directly (no transport thread)."""
    listener = NotificationListener()
    for text in texts:
        listener._receive(text, lambda: None)
    return listener


def test_notice_naming_the_uploads_round_answers_it_even_if_it_came_before_the_mark() -> None:
    listener = listener_with(notice("a1", run_number=1, round=1), notice("a2", run_number=1, round=2))
    assert listener.wait_for_aggregation(0.1, after=2, for_round=(1, 1)).aggregation_id == "a1"


def test_notice_of_a_later_round_does_not_answer_an_earlier_one() -> None:
    listener = listener_with(notice("a3", run_number=1, round=3))
    with pytest.raises(NotificationTimeout):
        listener.wait_for_aggregation(0.1, after=None, for_round=(1, 2))


def test_notice_without_a_round_answers_by_the_mark_as_before() -> None:
    listener = listener_with(notice("old"))
    mark = listener.mark()
    listener._receive(notice("new"), lambda: None)
    assert listener.wait_for_aggregation(0.1, after=mark, for_round=(1, 2)).aggregation_id == "new"


def test_run_details_parse_the_platforms_extra_fields() -> None:
    details = RunDetails.parse({"run_status": "start", "run_number": 2, "round": 4,
                                "latest_aggregation": {"aggregation_id": "x", "run_number": 2, "round": 3}})
    assert (details.round, details.latest_aggregation) == (4, AggregationRef("x", 2, 3))


def test_run_details_without_extra_fields_do_not_tell_the_round() -> None:
    details = RunDetails.parse({"run_status": "start", "run_number": 2})
    assert not details.tells_round and details.latest_aggregation is None


def test_upload_reply_of_the_official_platform_is_just_a_file_id() -> None:
    assert UploadReply.parse({"file_id": "f"}) == UploadReply("f")


def response(status: int, body: dict[str, str]) -> requests.Response:
    reply = requests.Response()
    reply.status_code, reply._content = status, json.dumps(body).encode()
    return reply


def test_stale_round_code_is_a_stale_round_error() -> None:
    error = BranchKeyClient._error(response(409, {"error": "update is for round 1", "code": "stale_round"}), "upload")
    assert isinstance(error, StaleRoundError) and isinstance(error, OutOfSyncError)


def test_run_blocked_is_recognised_by_code_or_by_the_official_text() -> None:
    by_code = BranchKeyClient._error(response(409, {"error": "paused", "code": "run_blocked"}), "upload")
    by_text = BranchKeyClient._error(response(409, {"error": "run is blocked"}), "upload")
    assert isinstance(by_code, RunNotStartedError) and isinstance(by_text, RunNotStartedError)


def in_step_state(**fields: object) -> LeafState:
    state = LeafState(leaf_id="leaf", run_number=1, round=3, consumed_aggregations=["a1", "a2"])
    for name, value in fields.items():
        setattr(state, name, value)
    return state


LATEST = AggregationRef("a2", 1, 2)


def platform(round_number: int | None = 3, latest: AggregationRef | None = LATEST) -> RunDetails:
    return RunDetails("start", 1, round_number, latest)


def test_leaf_at_the_platforms_round_and_model_is_in_step() -> None:
    _check_in_step(in_step_state(), platform())


@pytest.mark.parametrize("fields", [{"round": 2}, {"round": 4}, {"consumed_aggregations": ["a1"]}])
def test_leaf_behind_ahead_or_on_another_model_is_out_of_step(fields: dict[str, object]) -> None:
    with pytest.raises(OutOfSyncError, match="platform at run 1 round 3"):
        _check_in_step(in_step_state(**fields), platform())


def test_a_new_run_starts_in_step_with_no_model() -> None:
    state = LeafState(leaf_id="leaf", run_number=2, round=1)
    _check_in_step(state, RunDetails("start", 2, 1, AggregationRef("a9", 1, 9)))


def test_platform_that_does_not_say_its_round_is_not_checked() -> None:
    _check_in_step(in_step_state(round=7), platform(round_number=None, latest=None))


def row(status: str) -> RoundRecord:
    return RoundRecord(branch_id="b", leaf_id="leaf", leaf_name="leaf-1", run_number=1, round=2, status=status,
                       aggregation_id=f"{status}-aggregation")


def test_a_resynced_row_never_replaces_the_rounds_completed_row(tmp_path: Path) -> None:
    append_record(tmp_path, row("completed"))
    append_record(tmp_path, row("resynced"))
    assert sorted(r["status"] for r in history_rows(tmp_path)) == ["completed", "resynced"]


def test_holding_the_work_dir_removes_what_a_killed_run_left_mid_write(tmp_path: Path) -> None:
    leftovers = [tmp_path / ".state.json.k1.tmp", tmp_path / "models" / ".m.npz.k2.tmp",
                 tmp_path / "history" / ".run-0001.parquet.k3.tmp"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    with hold_work_dir(tmp_path):
        assert [path for path in leftovers if path.exists()] == []


def test_run_details_name_the_rounds_being_aggregated() -> None:
    details = RunDetails.parse({"run_status": "start", "run_number": 1, "round": 5, "aggregating": [4]})
    assert details.aggregating == (4,)


def run_at(round_number: int, latest_round: int | None, aggregating: tuple[int, ...] = (),
           status: str = "start") -> RunDetails:
    latest = AggregationRef(f"a{latest_round}", 1, latest_round) if latest_round else None
    return RunDetails(status, 1, round_number, latest, aggregating)


def test_latest_aggregation_of_the_uploads_round_answers_it() -> None:
    assert answer_from_run(run_at(3, 2), 1, 2, (1, 2)) == "a2"


def test_answer_is_taken_even_when_the_run_stopped_after_it() -> None:
    assert answer_from_run(run_at(3, 2, status="stop"), 1, 2, (1, 2)) == "a2"


def test_round_still_being_aggregated_is_waited_for() -> None:
    assert answer_from_run(run_at(3, 1, aggregating=(2,)), 1, 2, (1, 2)) is None


def test_round_the_federation_moved_past_is_out_of_step() -> None:
    with pytest.raises(OutOfSyncError, match="while this leaf was not listening"):
        answer_from_run(run_at(5, 4), 1, 2, (1, 2))


def test_round_closed_without_an_aggregate_is_out_of_step() -> None:
    with pytest.raises(OutOfSyncError, match="aggregation failed"):
        answer_from_run(run_at(3, 1), 1, 2, (1, 2))


def test_stopped_run_ends_the_wait() -> None:
    with pytest.raises(RunStoppedError):
        answer_from_run(run_at(2, 1, status="stop"), 1, 2, (1, 2))


def test_state_of_an_earlier_version_loads_with_its_metrics_marked_sent(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"leaf_id": "leaf", "round": 2, "phase": "downloaded",
                                                     "metrics_sent": True}))
    state = load_state(tmp_path, "leaf")
    assert state.evaluated and state.sent_metrics == ["train", "test"]
