"""A publication thread never outlives the interpreter: at exit it is stopped without another
attempt, and the exit waits for the attempt under way (a daemon thread inside pyarrow's native
code when Python finalises aborts the whole process)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import prefect_branchkey.flows.publishing.publication as publication_module
from prefect_branchkey.flows.publishing.publication import Publication


def _attempts(monkeypatch: pytest.MonkeyPatch, *, block: threading.Event | None = None,
              fail: bool = False) -> list[float]:
    """Replace the publication's attempt: record when each started, optionally wait for `block`, then
    fail or publish nothing."""
    started: list[float] = []

    def attempt(leaf_name: str, work_dir: Path) -> int:
        started.append(time.monotonic())
        if block is not None:
            block.wait(30)
        if fail:
            raise ConnectionError("Prefect API unreachable")
        return 0

    monkeypatch.setattr(publication_module, "publish_pending", attempt)
    return started


def test_exit_stops_a_publication_waiting_to_retry_without_another_attempt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publication_module, "RETRY_BACKOFF_S", (3600.0,))
    started = _attempts(monkeypatch, fail=True)
    publication = Publication("leaf-1", tmp_path).start()
    while not started:
        time.sleep(0.01)
    publication_module._stop_at_exit()
    assert not publication._thread.is_alive()
    assert len(started) == 1


def test_exit_waits_for_the_attempt_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    started = _attempts(monkeypatch, block=release)
    publication = Publication("leaf-1", tmp_path).start()
    while not started:
        time.sleep(0.01)
    threading.Timer(0.5, release.set).start()
    publication_module._stop_at_exit()
    assert release.is_set() and not publication._thread.is_alive()
