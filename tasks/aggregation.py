"""The wait-for-aggregation task: the aggregation that answers this leaf's upload.

Notices are the fast path. The platform's run details are the way back after a missed
notice (a WebSocket that was down when the aggregation was announced, a leaf killed while
waiting): checked at once when resuming, after every reconnect of the listener and every
`run_check_interval_s`. The wait is bounded: it never wedges the leaf.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from bk_blocks import (
    AggregationTimeoutError,
    BranchKeyClient,
    BranchKeyCredentials,
    NotificationTimeout,
    OutOfSyncError,
    RunStoppedError,
    TransientError,
)

from .clients import shared_client
from .retries import RETRY_OPTIONS

# How long one wait on the listener lasts before the task looks for a reconnect.
_SLICE_S = 1.0


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
    counted_in: tuple[int, int] | None = None,
    catch_up_first: bool = False,
) -> str:
    """Return the id of the aggregation that closed the round this leaf's upload counts in.

    `counted_in` is the (run, round) the platform said the upload counts in (None when it
    did not say): a notice naming it answers, as does a run details reply whose latest
    aggregation closed it. Without it, the first notice after the mark `after` (taken before
    uploading) answers, or with `after=None` the latest one not in `exclude`. The notice stays
    unacknowledged until the caller has stored the id (`shared_client(...).acknowledge(id)`).

    Raises `RunStoppedError` when the run is over, `OutOfSyncError` when the federation has
    moved past the upload's round (its aggregation was missed: resync), and, after
    `timeout_s` without an answer, `AggregationTimeoutError` (not retried).
    """
    logger = get_run_logger()
    client = shared_client(credentials, logger)
    client.listen()
    deadline = time.monotonic() + timeout_s
    connections = client.connections
    next_check = time.monotonic() + (0 if catch_up_first else run_check_interval_s)
    while True:
        if time.monotonic() >= next_check or client.connections != connections:
            connections = client.connections
            found = _caught_up(client, run_number, round_number, counted_in)
            if found is not None:
                logger.info("round %d aggregated as %s (caught up from the run details)", round_number, found)
                return found
            next_check = time.monotonic() + run_check_interval_s
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AggregationTimeoutError(
                f"round {round_number} was not aggregated within {timeout_s:.0f} s of waiting; the round fails "
                "here and the leaf's next run checks the platform again")
        try:
            notice = client.wait_for_aggregation(min(_SLICE_S, remaining), after=after, exclude=exclude,
                                                 auto_ack=False, for_round=counted_in)
        except NotificationTimeout:
            continue
        logger.info("round %d aggregated as %s", round_number, notice.aggregation_id)
        return notice.aggregation_id


def _caught_up(client: BranchKeyClient, run_number: int, round_number: int,
               counted_in: tuple[int, int] | None) -> str | None:
    """Ask the platform: the aggregation that closed `counted_in` if it is the latest one, None
    to keep waiting; raises when the run is over or the federation has moved past the round."""
    try:
        details = client.run_details()
    except TransientError as exc:
        client.log.warning("run check failed (%s); still waiting for round %d", exc, round_number)
        return None
    if details.run_status == "stop" or details.run_number != run_number:
        raise RunStoppedError(
            f"run {run_number} ended (now run {details.run_number}, {details.run_status}) while round "
            f"{round_number} waited for its aggregation"
        )
    latest = details.latest_aggregation
    if counted_in is None or latest is None or latest.run_number != counted_in[0]:
        return None
    if latest.round == counted_in[1]:
        return latest.aggregation_id
    if latest.round > counted_in[1]:
        raise OutOfSyncError(f"round {counted_in[1]} was aggregated while this leaf was not listening; the "
                             f"federation is at round {details.round} (latest aggregation {latest.aggregation_id})")
    return None
