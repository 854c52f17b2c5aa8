"""An outage is logged at a sane rate: one warning when it starts, a reminder every few
minutes however many attempts fail, one line when it is over."""

from __future__ import annotations

import logging

import pytest

from prefect_branchkey.bk_blocks import outages
from prefect_branchkey.bk_blocks.outages import OutageLog

from ..support.clock import Clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(outages.time, "monotonic", clock)
    return clock


@pytest.fixture
def outage(caplog: pytest.LogCaptureFixture) -> OutageLog:
    caplog.set_level(logging.DEBUG, logger="test.outage")
    return OutageLog("websocket notifications", logging.getLogger("test.outage"))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_first_failure_of_an_outage_is_one_warning(outage: OutageLog, clock: Clock,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    outage.failed("ConnectionError: refused", retry_in_s=0.5)
    assert _warnings(caplog) == ["websocket notifications interrupted (ConnectionError: refused); retrying in 0.5 s"]


def test_an_hour_of_failed_attempts_logs_a_reminder_every_five_minutes(outage: OutageLog, clock: Clock,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(120):
        outage.failed("refused", retry_in_s=30)
        clock.now += 30
    assert len(_warnings(caplog)) == 1 + 3600 // 300 - 1


def test_reminder_says_how_long_and_how_many_attempts(outage: OutageLog, clock: Clock,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    outage.failed("refused")
    clock.now += 150
    outage.failed("refused")
    clock.now += 150
    outage.failed("refused")
    assert _warnings(caplog)[-1] == ("websocket notifications still failing after 300 s and 3 attempts (refused); "
                                     "still retrying")


def test_end_of_an_outage_is_one_info_line(outage: OutageLog, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    outage.failed("refused")
    clock.now += 12
    outage.ended()
    outage.ended()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["websocket notifications back after 12 s and 1 failed attempts"]


def test_success_without_an_outage_logs_nothing(outage: OutageLog, caplog: pytest.LogCaptureFixture) -> None:
    outage.ended()
    assert caplog.records == []


def test_next_outage_starts_with_a_warning_again(outage: OutageLog, clock: Clock,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    outage.failed("refused")
    outage.ended()
    outage.failed("reset")
    assert len(_warnings(caplog)) == 2
