"""The federation dashboard flow against a real Prefect server: it reads the leaves' round events
back from the API, publishes the federation artifacts under the demo's keys, and adds no version
when nothing new arrived."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

from prefect_branchkey.flows.federation.dashboard import federation_dashboard
from prefect_branchkey.flows.leaf.history import RoundRecord
from prefect_branchkey.flows.publishing.observability import artifact_key, round_event
from prefect_branchkey.flows.publishing.publication import round_event_id, send_events

from ..support.flow_helpers import artifacts, events


def _round(branch_id: str, leaf: str, round_number: int, accuracy: float) -> RoundRecord:
    now = datetime.now(UTC)
    return RoundRecord(branch_id=branch_id, leaf_id=f"{leaf}-{branch_id}", leaf_name=leaf, run_number=1,
                       round=round_number, status="completed", aggregation_id=f"agg-{round_number}",
                       eval_metrics={"accuracy": accuracy}, branch_name=f"dash-{branch_id[:8]}",
                       started_at=now, finished_at=now)


def _report(prefect_api: str, record: RoundRecord) -> None:
    """Send the round's event as a leaf's publication does, and wait until the server stored it."""
    event_id = round_event_id(record.leaf_id, record.run_number, record.round)
    send_events([round_event(record, event_id=event_id)])
    stored = events(prefect_api, "branchkey.round.completed", f"branchkey.leaf.{record.leaf_id}", record.round)
    assert any(e["id"] == str(event_id) for e in stored), "the server stored the round event"


def test_dashboard_publishes_every_leaf_side_by_side_from_their_events(prefect_api: str) -> None:
    branch = str(uuid.uuid4())
    for leaf, accuracy in (("leaf-1", 0.7), ("leaf-2", 0.6)):
        _report(prefect_api, _round(branch, leaf, 1, accuracy))
    published = federation_dashboard(branch_id=branch, leaves=["leaf-1", "leaf-2", "leaf-3"], settle_s=0)
    name = f"dash-{branch[:8]}"
    assert published == {name: 1}
    table = artifacts(prefect_api, artifact_key("federation", name))[0]["data"]
    assert '"leaf-1 accuracy": 0.7' in table and '"leaf-2 accuracy": 0.6' in table and '"missing": "leaf-3"' in table
    summary = artifacts(prefect_api, artifact_key("federation-summary", name))[0]["data"]
    assert "| leaf-3 | missing (no round reported) |" in summary


def test_dashboard_adds_no_version_until_a_new_round_is_reported(prefect_api: str) -> None:
    branch = str(uuid.uuid4())
    name = f"dash-{branch[:8]}"
    _report(prefect_api, _round(branch, "leaf-1", 1, 0.7))
    assert federation_dashboard(branch_id=branch, settle_s=0) == {name: 1}
    assert federation_dashboard(branch_id=branch, settle_s=0) == {}
    _report(prefect_api, _round(branch, "leaf-1", 2, 0.8))
    assert federation_dashboard(branch_id=branch, settle_s=0) == {name: 2}
    assert len(artifacts(prefect_api, artifact_key("federation", name))) == 2


def test_a_watching_run_publishes_a_round_reported_while_it_watches(prefect_api: str) -> None:
    branch = str(uuid.uuid4())
    name = f"dash-{branch[:8]}"
    _report(prefect_api, _round(branch, "leaf-1", 1, 0.7))
    late = threading.Timer(2.0, _report, (prefect_api, _round(branch, "leaf-1", 2, 0.8)))
    late.start()
    try:
        assert federation_dashboard(branch_id=branch, settle_s=0, watch_s=8, poll_s=1) == {name: 2}
    finally:
        late.join()
    assert len(artifacts(prefect_api, artifact_key("federation", name))) == 2
