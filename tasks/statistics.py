"""The statistics tasks: a site's analytics archive up, the federation's combined result down.

They retry like the other platform tasks (only transient failures). The upload carries an
idempotency key derived from the leaf, the run, the round and the archive's digest, so a
retried or rerun upload counts once; the wait takes the notice naming the upload's round, or
catches up from the run details' `latest_statistics`, read as `tasks/run_checks.py` says.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prefect_branchkey.bk_blocks import AggregationTimeoutError, NotificationTimeout, RunStoppedError
from prefect_branchkey.bk_blocks.analytics import inspect_analytics
from prefect_branchkey.bk_blocks.archive import ArchiveError
from prefect_branchkey.bk_blocks.client import check_file_id
from prefect_branchkey.bk_blocks.files import sha256_file
from prefect_branchkey.tasks.retries import RETRY_OPTIONS
from prefect_branchkey.tasks.run_checks import RunChecks
from prefect_branchkey.tasks.session import LeafSession
from prefect_branchkey.tasks.upload import UploadReceipt, idempotency_key

_SLICE_S = 1.0


@task(name="upload_statistics", task_run_name="upload-statistics-run-{run_number}", cache_policy=NO_CACHE,
      **RETRY_OPTIONS)
def upload_statistics(session: LeafSession, archive: Path, run_number: int, round_number: int,
                      sha256: str | None = None) -> UploadReceipt:
    """Upload an analytics archive into the open round; return the platform's receipt. `sha256`
    (hex) spares hashing the archive again when the caller already did."""
    logger = get_run_logger()
    session.mark_round(run_number, round_number)
    digest = bytes.fromhex(sha256) if sha256 else sha256_file(archive)
    key = statistics_key(session.credentials.leaf_id, run_number, round_number, digest.hex())
    reply = session.client.upload_update(archive, idempotency_key=key, sha256=digest)
    logger.info("statistics %s accepted as %s", Path(archive).name, reply.file_id)
    counted_in = (reply.run_number, reply.round) if reply.run_number is not None and reply.round is not None else None
    return UploadReceipt(reply.file_id, key, digest.hex(), Path(archive).stat().st_size, counted_in,
                         reply.aggregation_id)


def statistics_key(leaf_id: str, run_number: int, round_number: int, sha256: str) -> str:
    """A statistics upload's idempotency key: an update's, marked as statistics."""
    return "stats." + idempotency_key(leaf_id, run_number, round_number, sha256)


@task(name="wait_for_statistics", task_run_name="wait-for-statistics-run-{run_number}", cache_policy=NO_CACHE,
      **RETRY_OPTIONS)
def wait_for_statistics(session: LeafSession, run_number: int, round_number: int,
                        counted_in: tuple[int, int] | None, timeout_s: float = 600.0,
                        run_check_interval_s: float = 5.0) -> str:
    """The id of the combined result of the round the statistics count in: from its notice, or from
    the run details when the notice was missed; bounded by `timeout_s`. The run details are read
    every `run_check_interval_s`, after a reconnect of the listener and after a run status notice
    since the upload (a stopped run ends the wait within a second, not at the next check); a read
    that fails while the platform is unreachable is logged, and the wait goes on."""
    logger = get_run_logger()
    client = session.client
    after = session.mark_of(run_number, round_number)
    client.listen()
    deadline = time.monotonic() + timeout_s
    checks = RunChecks(client, session.status_notices_at_mark(run_number, round_number), run_check_interval_s,
                       f"the statistics of run {run_number}")
    while time.monotonic() < deadline:
        try:
            notice = client.wait_for_aggregation(max(0.05, min(_SLICE_S, deadline - time.monotonic())), after=after,
                                                 for_round=counted_in)
            logger.info("statistics combined as %s", notice.aggregation_id)
            return notice.aggregation_id
        except NotificationTimeout:
            pass
        if checks.due() and (details := checks.read()) is not None:
            latest = details.latest_statistics
            if counted_in is not None and latest is not None and (latest.run_number, latest.round) == counted_in:
                logger.info("statistics combined as %s (caught up from the run details)", latest.aggregation_id)
                return latest.aggregation_id
            if details.run_status == "stop" or details.run_number != run_number:
                raise RunStoppedError(f"run {run_number} ended while its statistics waited to be combined")
    raise AggregationTimeoutError(f"the statistics were not combined within {timeout_s:.0f} s")


@task(name="download_statistics", task_run_name="download-statistics-{aggregation_id}", cache_policy=NO_CACHE,
      **RETRY_OPTIONS)
def download_statistics(session: LeafSession, aggregation_id: str, dest_dir: Path) -> Path:
    """Download the combined statistics to `dest_dir/<aggregation_id>.npz`; an intact copy is kept."""
    target = Path(dest_dir) / f"{check_file_id(aggregation_id)}.npz"
    if target.exists():
        try:
            inspect_analytics(target, combined=True)
            return target
        except ArchiveError:
            target.unlink()
    return session.client.download_statistics(aggregation_id, dest_dir)
