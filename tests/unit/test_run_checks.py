"""When a wait reads the run details: at its interval, at once after a reconnect or a run status
notice since the round's mark, and an unreachable platform is one logged outage, not a failure."""

from __future__ import annotations

import logging
from typing import cast

import pytest

from prefect_branchkey.bk_blocks import AuthenticationError, BranchKeyClient, BranchKeyError, RunDetails, TransientError
from prefect_branchkey.tasks.run_checks import RunChecks

from ..support.clock import Clock

INTERVAL_S = 15.0


class Client:
    """The parts of `BranchKeyClient` a run check reads, with the platform's answer set by the test."""

    def __init__(self) -> None:
        self.log = logging.getLogger("test.run_checks")
        self.connections = 1
        self.run_status_notices = 0
        self.answer: RunDetails | BranchKeyError = RunDetails("start", 1)
        self.reads = 0

    def run_details(self) -> RunDetails:
        self.reads += 1
        if isinstance(self.answer, BranchKeyError):
            raise self.answer
        return self.answer


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(caplog: pytest.LogCaptureFixture) -> Client:
    caplog.set_level(logging.DEBUG, logger="test.run_checks")
    return Client()


def checks_of(client: Client, clock: Clock, status_notices_at_mark: int | None = None,
              at_once: bool = False) -> RunChecks:
    return RunChecks(cast(BranchKeyClient, client), status_notices_at_mark, INTERVAL_S, "round 1", at_once=at_once,
                     clock=clock)


def test_a_check_is_due_only_once_its_interval_has_passed(client: Client, clock: Clock) -> None:
    checks = checks_of(client, clock)
    clock.now += INTERVAL_S - 0.1
    assert not checks.due()
    clock.now += 0.1
    assert checks.due()


def test_a_check_at_once_is_due_before_its_interval(client: Client, clock: Clock) -> None:
    assert checks_of(client, clock, at_once=True).due()


def test_a_reconnect_of_the_listener_makes_a_check_due_at_once(client: Client, clock: Clock) -> None:
    checks = checks_of(client, clock)
    client.connections += 1
    assert checks.due()


def test_a_run_status_notice_during_the_wait_makes_a_check_due_at_once(client: Client, clock: Clock) -> None:
    checks = checks_of(client, clock)
    client.run_status_notices += 1
    assert checks.due()


def test_a_run_status_notice_between_the_mark_and_the_wait_makes_the_first_check_due(client: Client,
                                                                                     clock: Clock) -> None:
    client.run_status_notices = 3
    assert checks_of(client, clock, status_notices_at_mark=2).due()
    assert not checks_of(client, clock, status_notices_at_mark=3).due()


def test_a_read_counts_the_notices_and_reconnects_so_far_as_checked(client: Client, clock: Clock) -> None:
    checks = checks_of(client, clock)
    client.connections += 1
    client.run_status_notices += 1
    assert checks.read() == client.answer
    assert not checks.due()


def test_the_next_timed_check_counts_from_the_end_of_a_slow_read(client: Client, clock: Clock) -> None:
    checks = checks_of(client, clock, at_once=True)

    def slow_answer() -> RunDetails:
        clock.now += 10
        return RunDetails("start", 1)

    client.run_details = slow_answer  # type: ignore[method-assign]
    checks.read()
    assert checks.seconds_to_next() == INTERVAL_S


def test_an_unreachable_platform_reads_as_nothing_and_one_warning(client: Client, clock: Clock,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    checks = checks_of(client, clock)
    client.answer = TransientError("connection refused")
    assert [checks.read() for _ in range(3)] == [None, None, None]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["run check while round 1 waits interrupted (connection refused); retrying"]
    assert checks.seconds_to_next() == INTERVAL_S


def test_the_platform_answering_again_ends_the_outage_in_one_line(client: Client, clock: Clock,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    checks = checks_of(client, clock)
    client.answer = TransientError("connection refused")
    checks.read()
    client.answer = RunDetails("stop", 1)
    assert checks.read() == RunDetails("stop", 1)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "run check while round 1 waits back after 0 s and 1 failed attempts"]


def test_a_refusal_that_is_not_transient_is_raised(client: Client, clock: Clock) -> None:
    checks = checks_of(client, clock)
    client.answer = AuthenticationError("token revoked")
    with pytest.raises(AuthenticationError, match="token revoked"):
        checks.read()
