"""Publication off the round's path: rounds recorded but not published (the process died first)
are published by the leaf's next run, once each; a Prefect API that does not answer leaves them
pending, never lost."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

import prefect_branchkey.flows.publishing.publication as publication_module
from prefect_branchkey.bk_dev.prefect_server import LocalPrefectServer
from prefect_branchkey.flows.leaf.history import RoundRecord, append_record
from prefect_branchkey.flows.publishing.observability import artifact_key
from prefect_branchkey.flows.publishing.publication import (
    Publication,
    mark_published,
    published_through,
    publishing,
    round_event_id,
)

from ..support.flow_helpers import artifacts, events


def _record(leaf_id: str, leaf_name: str, round_number: int) -> RoundRecord:
    now = datetime.now(UTC)
    return RoundRecord(branch_id="branch", leaf_id=leaf_id, leaf_name=leaf_name, run_number=1, round=round_number,
                       status="completed", aggregation_id=f"agg-{round_number}", eval_metrics={"accuracy": 0.5},
                       started_at=now, finished_at=now)


@pytest.fixture
def leaf(tmp_path: Path) -> tuple[str, str, Path]:
    """A leaf (id, name) whose work dir holds rounds 1 and 2, only round 1 published."""
    leaf_id, name = str(uuid.uuid4()), f"pub-{uuid.uuid4().hex[:8]}"
    for round_number in (1, 2):
        append_record(tmp_path, _record(leaf_id, name, round_number))
    mark_published(tmp_path, 1, 1)
    return leaf_id, name, tmp_path


def test_rounds_recorded_but_not_published_are_published_by_the_next_run(
        leaf: tuple[str, str, Path], prefect_api: str) -> None:
    leaf_id, name, work_dir = leaf
    with publishing(name, work_dir):
        pass
    assert published_through(work_dir) == (1, 2)
    versions = artifacts(prefect_api, artifact_key("history", name))
    assert len(versions) == 1 and [row["round"] for row in json.loads(versions[0]["data"])] == [1, 2]
    found = events(prefect_api, "branchkey.round.completed", f"branchkey.leaf.{leaf_id}", expected=1)
    assert [e["payload"]["round"] for e in found] == [2]
    assert found[0]["id"] == str(round_event_id(leaf_id, 1, 2))


def test_a_round_published_twice_is_one_event(leaf: tuple[str, str, Path], prefect_api: str) -> None:
    leaf_id, name, work_dir = leaf
    for _ in range(2):
        mark_published(work_dir, 1, 1)
        with publishing(name, work_dir):
            pass
    assert len(artifacts(prefect_api, artifact_key("history", name))) == 2, "published twice"
    found = events(prefect_api, "branchkey.round.completed", f"branchkey.leaf.{leaf_id}", expected=2, timeout=10)
    assert len(found) == 1


def test_round_event_is_related_to_its_flow_run_and_tags(leaf: tuple[str, str, Path], prefect_api: str) -> None:
    leaf_id, name, work_dir = leaf
    with publishing(name, work_dir):
        pass
    (event,) = events(prefect_api, "branchkey.round.completed", f"branchkey.leaf.{leaf_id}", expected=1)
    related = {r["prefect.resource.id"]: r["prefect.resource.role"] for r in event["related"]}
    assert related["branchkey.branch.branch"] == "branch"
    assert related[f"prefect.tag.leaf:{name}"] == "tag"
    assert event["occurred"].startswith(str(datetime.now(UTC).year))


def test_publication_survives_an_unexpected_error_and_retries_on_close(
        leaf: tuple[str, str, Path], prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, name, work_dir = leaf
    real = publication_module.publish_artifacts
    calls: list[int] = []

    def fail_once(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("an unexpected failure")
        real(*args, **kwargs)

    monkeypatch.setattr(publication_module, "publish_artifacts", fail_once)
    publication = Publication(name, work_dir).start()
    assert publication.close(timeout=60) is True
    assert published_through(work_dir) == (1, 2) and len(calls) == 2


def test_an_unreachable_prefect_api_leaves_rounds_pending(leaf: tuple[str, str, Path], prefect_api: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    _, name, work_dir = leaf
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
        publication = Publication(name, work_dir).start()
        assert publication.close(timeout=60) is False
    assert published_through(work_dir) == (1, 1)
    assert "could not publish its rounds to Prefect" in caplog.text and "next run publishes them" in caplog.text


def test_a_resynced_row_and_the_completed_row_of_its_round_are_both_published(
        leaf: tuple[str, str, Path], prefect_api: str) -> None:
    leaf_id, name, work_dir = leaf
    append_record(work_dir, replace(_record(leaf_id, name, 2), status="resynced", aggregation_id="agg-2"))
    with publishing(name, work_dir):
        pass
    assert len(events(prefect_api, "branchkey.round.completed", f"branchkey.leaf.{leaf_id}", expected=1)) == 1
    resynced = events(prefect_api, "branchkey.round.resynced", f"branchkey.leaf.{leaf_id}", expected=1)
    assert [e["payload"]["round"] for e in resynced] == [2]


@pytest.fixture
def impatient_prefect_api(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Prefect server (embedded PostgreSQL) that closes an events websocket whose client has not
    answered its keepalive ping within 0.5 s, pinging every 0.5 s: the 20 s default, compressed."""
    monkeypatch.setenv("PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL", "0.5")
    monkeypatch.setenv("PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT", "0.5")
    with LocalPrefectServer(tmp_path_factory.mktemp("impatient"), database="postgres") as server, \
            temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url


def test_a_round_longer_than_the_events_keepalive_is_published_without_a_warning(
        leaf: tuple[str, str, Path], impatient_prefect_api: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A round of hours, compressed: the leaf idle for six of the server's keepalive windows
    between two rounds. No events connection waits idle, so none times out."""
    leaf_id, name, work_dir = leaf
    thread_errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    with caplog.at_level(logging.DEBUG), publishing(name, work_dir) as publication:
        deadline = time.monotonic() + 60
        while published_through(work_dir) != (1, 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3)
        append_record(work_dir, _record(leaf_id, name, 3))
        publication.notify()
    assert published_through(work_dir) == (1, 3)
    found = events(impatient_prefect_api, "branchkey.round.completed", f"branchkey.leaf.{leaf_id}", expected=2)
    assert sorted(e["payload"]["round"] for e in found) == [2, 3]
    assert thread_errors == []
    assert [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_publication_catches_up_in_the_background_once_prefect_answers_again(
        leaf: tuple[str, str, Path], prefect_api: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The Prefect API down for a while during a long round: one warning, retries in the background
    without a new round to trigger them, one line when it caught up, every round published once."""
    leaf_id, name, work_dir = leaf
    monkeypatch.setattr(publication_module, "RETRY_BACKOFF_S", (0.2,))
    real = publication_module.publish_artifacts
    outage = {"calls": 0}

    def down_for_three_attempts(*args: Any, **kwargs: Any) -> None:
        outage["calls"] += 1
        if outage["calls"] <= 3:
            raise ConnectionError("Prefect API unreachable")
        real(*args, **kwargs)

    monkeypatch.setattr(publication_module, "publish_artifacts", down_for_three_attempts)
    with caplog.at_level(logging.DEBUG, logger=publication_module.__name__):
        publication = Publication(name, work_dir).start()
        deadline = time.monotonic() + 60
        while published_through(work_dir) != (1, 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert publication.close(timeout=60) is True
    assert published_through(work_dir) == (1, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "Prefect API unreachable" in warnings[0]
    assert any("Prefect reachable again" in r.getMessage() for r in caplog.records)
    assert len(events(prefect_api, "branchkey.round.completed", f"branchkey.leaf.{leaf_id}", expected=1)) == 1
