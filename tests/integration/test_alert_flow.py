"""The `branchkey-alert` flow against a real Prefect server: the leaf's alert artifact, the same
text through a notification Block when one is named, and a Block that cannot notify refused."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.blocks.system import Secret

from prefect_branchkey.flows.alerts import AlertNotifyError, branchkey_alert
from prefect_branchkey.flows.publishing.observability import artifact_key

from ..support.flow_helpers import artifacts
from ..support.webhook import webhook_server

PAYLOAD = {"round": 3, "run_number": 1, "error": "AggregationTimeoutError: no aggregate within 600 s"}


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook receiver for the test: its URL and the JSON bodies posted to it."""
    received: list[dict[str, Any]] = []
    server = webhook_server(received)
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def _alert(leaf: str, notify_block: str | None = None) -> str:
    return branchkey_alert(kind="failed-round", leaf=leaf, event="branchkey.round.failed",
                           occurred="2026-11-30 12:00:00+00:00", automation="branchkey-failed-round",
                           payload=PAYLOAD, notify_block=notify_block)


def test_an_alert_is_a_version_of_the_leafs_alert_artifact(prefect_api: str) -> None:
    leaf = f"alert-{uuid.uuid4().hex[:8]}"
    text = _alert(leaf)
    (version,) = artifacts(prefect_api, artifact_key("alert", leaf))
    assert version["data"] == text and "no aggregate within 600 s" in text


def test_an_alert_sends_its_text_through_the_named_notification_block(
        prefect_api: str, webhook: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = webhook
    name = f"hook-{uuid.uuid4().hex[:8]}"
    CustomWebhookNotificationBlock(name="ops", url=url,
                                   json_data={"subject": "{{subject}}", "body": "{{body}}"}).save(name)
    leaf = f"alert-{uuid.uuid4().hex[:8]}"
    text = _alert(leaf, notify_block=f"custom-webhook/{name}")
    assert received == [{"subject": f"BranchKey: {leaf} failed a round", "body": text}]


def test_an_alert_naming_a_block_that_cannot_notify_is_refused(prefect_api: str) -> None:
    name = f"not-notify-{uuid.uuid4().hex[:8]}"
    Secret(value="x").save(name)
    with pytest.raises(AlertNotifyError, match="not a notification Block"):
        _alert("alert-leaf", notify_block=f"secret/{name}")


def test_an_alert_naming_a_missing_block_is_refused(prefect_api: str) -> None:
    with pytest.raises(AlertNotifyError, match="cannot load notification Block 'slack-webhook/nobody'"):
        _alert("alert-leaf", notify_block="slack-webhook/nobody")
