"""The run check before a round: at once when the run is started (or stopped), through the
wait-for-run task (retried, visible in the UI) while it is paused or the platform does not answer."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prefect_branchkey.bk_blocks import BranchKeyClient, RunDetails, RunNotStartedError, TransientError
from prefect_branchkey.tasks.retries import RETRY_OPTIONS
from prefect_branchkey.tasks.session import LeafSession


@task(name="wait_for_run", task_run_name="wait-for-run-round-{round_number}", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def wait_for_run(
    session: LeafSession,
    round_number: int = 0,
    poll_interval_s: float = 10.0,
    timeout_s: float = 6 * 3600,
) -> RunDetails:
    """Return the run once it is `start` (or `stop`, so the caller can end cleanly).

    While the run is `pause`, check every `poll_interval_s` (sooner when a run_status
    notice arrives); fail with `RunNotStartedError` after `timeout_s`.
    """
    logger = get_run_logger()
    client = session.client
    client.listen()
    deadline = time.monotonic() + timeout_s
    while True:
        details = client.run_details()
        if details.run_status in ("start", "stop"):
            logger.info("run %d is %s", details.run_number, details.run_status)
            return details
        if time.monotonic() >= deadline:
            raise RunNotStartedError(f"run still '{details.run_status}' after {timeout_s:.0f} s",
                                     run_status=details.run_status)
        logger.info("run %d is %s; checking again within %.0f s", details.run_number, details.run_status,
                    poll_interval_s)
        _sleep_until_status_changes(client, details.run_status, min(poll_interval_s, deadline - time.monotonic()))


def _sleep_until_status_changes(client: BranchKeyClient, status: str, seconds: float) -> None:
    """Sleep up to `seconds`, waking early when a run_status notice changes the status."""
    end = time.monotonic() + max(seconds, 0)
    while time.monotonic() < end and client.run_status == status:
        time.sleep(0.2)


def current_run(session: LeafSession, round_number: int, poll_interval_s: float, timeout_s: float) -> RunDetails:
    """The run, once started or stopped. When the platform already says so (the usual case before
    a round), that is one request and no task run: a task run would cost the Prefect server three
    state events and show only "run is started". Otherwise (paused, or the platform did not
    answer) the `wait_for_run` task waits, with its retries."""
    client = session.client
    try:
        client.listen()
        details = client.run_details()
        if details.run_status in ("start", "stop"):
            return details
    except TransientError:
        pass
    return wait_for_run(session, round_number, poll_interval_s, timeout_s)
