"""The wait-for-aggregation task: the aggregation that answers this leaf's upload.

Notices are the fast path. The platform's run details are the way back after a missed
notice (a WebSocket that was down when the aggregation was announced, a leaf killed while
waiting): checked at once when resuming, and as `tasks/run_checks.py` says (every
`run_check_interval_s`, after a reconnect, after a run status notice since the round's upload was
marked). The wait is bounded: it never wedges the leaf.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prefect_branchkey.bk_blocks import (
    AggregationTimeoutError,
    NotificationTimeout,
    OutOfSyncError,
    RunDetails,
    RunStoppedError,
)
from prefect_branchkey.tasks.retries import RETRY_OPTIONS
from prefect_branchkey.tasks.run_checks import RunChecks
from prefect_branchkey.tasks.session import LeafSession

# How long one wait on the listener lasts before the task looks for a reconnect, and the
# shortest look (a notice already there is taken before the platform is asked).
_SLICE_S = 1.0
_FIRST_LOOK_S = 0.05


@task(name="wait_for_aggregation", task_run_name="wait-for-aggregation-round-{round_number}",
      cache_policy=NO_CACHE, **RETRY_OPTIONS)
def wait_for_aggregation(
    session: LeafSession,
    round_number: int,
    run_number: int,
    exclude: Sequence[str] = (),
    timeout_s: float = 3600.0,
    run_check_interval_s: float = 15.0,
    counted_in: tuple[int, int] | None = None,
    catch_up_first: bool = False,
) -> str:
    """Return the id of the aggregation that closed the round this leaf's upload counts in.

    `counted_in` is the (run, round) the platform said the upload counts in (None when it
    did not say): a notice naming it answers, as does a run details reply whose latest
    aggregation closed it. Without it, the first notice after the round's mark (taken by
    `upload_weights`) answers, or when the upload was not marked (a resumed round) the latest
    one not in `exclude`. The notice stays unacknowledged until the caller has stored the id
    (`session.client.acknowledge(id)`).

    Raises `RunStoppedError` when the run is over, `OutOfSyncError` when the upload's round
    will never be answered (the federation moved past it while the leaf was not listening, or
    its aggregation failed: resync), and, after `timeout_s` without an answer,
    `AggregationTimeoutError` (not retried).
    """
    logger = get_run_logger()
    client = session.client
    after = session.mark_of(run_number, round_number)
    client.listen()
    deadline = time.monotonic() + timeout_s
    checks = RunChecks(client, session.status_notices_at_mark(run_number, round_number), run_check_interval_s,
                       f"round {round_number}", at_once=catch_up_first)
    while True:
        look_s = max(_FIRST_LOOK_S, min(_SLICE_S, deadline - time.monotonic(), checks.seconds_to_next()))
        try:
            notice = client.wait_for_aggregation(look_s, after=after, exclude=exclude, auto_ack=False,
                                                 for_round=counted_in)
            logger.info("round %d aggregated as %s", round_number, notice.aggregation_id)
            session.notice_extras[notice.aggregation_id] = dict(notice.extra)
            session.forget_mark(run_number, round_number)
            return notice.aggregation_id
        except NotificationTimeout:
            pass
        if checks.due() and (details := checks.read()) is not None:
            found = answer_from_run(details, run_number, round_number, counted_in)
            if found is not None:
                logger.info("round %d aggregated as %s (caught up from the run details)", round_number, found)
                session.forget_mark(run_number, round_number)
                return found
        if deadline - time.monotonic() <= 0:
            raise AggregationTimeoutError(
                f"round {round_number} was not aggregated within {timeout_s:.0f} s of waiting; the round fails "
                "here and the leaf's next run checks the platform again")


def answer_from_run(details: RunDetails, run_number: int, round_number: int,
                    counted_in: tuple[int, int] | None) -> str | None:
    """What the run details say about an upload counted in `counted_in`: the aggregation that
    closed it, None (keep waiting), or an error when it will never be answered."""
    latest = details.latest_aggregation
    if counted_in is not None and latest is not None and (latest.run_number, latest.round) == counted_in:
        return latest.aggregation_id
    if details.run_status == "stop" or details.run_number != run_number:
        raise RunStoppedError(
            f"run {run_number} ended (now run {details.run_number}, {details.run_status}) while round "
            f"{round_number} waited for its aggregation"
        )
    if counted_in is None or not details.tells_round:
        return None
    if latest is not None and latest.run_number == counted_in[0] and latest.round > counted_in[1]:
        raise OutOfSyncError(f"round {counted_in[1]} was aggregated while this leaf was not listening; the "
                             f"federation is at round {details.round} (latest aggregation {latest.aggregation_id})")
    if details.round is not None and details.round > counted_in[1] and counted_in[1] not in details.aggregating:
        raise OutOfSyncError(f"round {counted_in[1]} closed without an aggregate (its aggregation failed on the "
                             f"platform); the federation is at round {details.round}")
    return None
