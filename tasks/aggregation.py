"""The wait-for-aggregation task: the aggregation that follows this leaf's upload."""

from __future__ import annotations

import time
from collections.abc import Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from bk_blocks import (
    BranchKeyClient,
    BranchKeyCredentials,
    NotificationTimeout,
    RunStoppedError,
)

from .clients import shared_client
from .retries import RETRY_OPTIONS


@task(name="wait_for_aggregation", task_run_name="wait-for-aggregation-round-{round_number}",
      cache_policy=NO_CACHE, **RETRY_OPTIONS)
def wait_for_aggregation(
    credentials: BranchKeyCredentials | str,
    round_number: int,
    run_number: int,
    after: int | None = None,
    exclude: Sequence[str] = (),
    timeout_s: float = 3600.0,
    run_check_interval_s: float = 15.0,
) -> str:
    """Return the aggregation id announced after the mark `after` (taken before uploading).

    With `after=None` (resuming in a new process) the latest announced aggregation not
    in `exclude` is taken. The notice stays unacknowledged until the caller has stored
    the id (`shared_client(...).acknowledge(id)`), so a crash in between gets it again.
    Every `run_check_interval_s` the run is checked: if it was stopped, or restarted as
    a new run, this round will never aggregate and `RunStoppedError` says so.
    """
    logger = get_run_logger()
    client = shared_client(credentials, logger)
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            notice = client.wait_for_aggregation(max(0.1, min(run_check_interval_s, remaining)), after=after,
                                                 exclude=exclude, auto_ack=False)
        except NotificationTimeout:
            _check_run_continues(client, run_number, round_number)
            if remaining <= run_check_interval_s:
                raise NotificationTimeout(f"no aggregation for round {round_number} within {timeout_s:.0f} s") from None
            continue
        logger.info("round %d aggregated as %s", round_number, notice.aggregation_id)
        return notice.aggregation_id


def _check_run_continues(client: BranchKeyClient, run_number: int, round_number: int) -> None:
    """Raise `RunStoppedError` if the run this round belongs to is over."""
    details = client.run_details()
    if details.run_status == "stop" or details.run_number != run_number:
        raise RunStoppedError(
            f"run {run_number} ended (now run {details.run_number}, {details.run_status}) while round "
            f"{round_number} waited for its aggregation"
        )
