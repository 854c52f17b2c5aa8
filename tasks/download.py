"""The download task: an aggregate into the work dir, never as a partial file. A disk without room
for it fails the task at once (`DiskFullError`, not retried); the state keeps the round at
`aggregated`, so the next run downloads it again once space is freed."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prefect_branchkey.bk_blocks.archive import ArchiveError, inspect_aggregate
from prefect_branchkey.bk_blocks.client import check_file_id
from prefect_branchkey.tasks.retries import RETRY_OPTIONS
from prefect_branchkey.tasks.session import LeafSession


@task(name="download_aggregate", task_run_name="download-round-{round_number}", cache_policy=NO_CACHE,
      **RETRY_OPTIONS)
def download_aggregate(
    session: LeafSession, aggregation_id: str, dest_dir: Path, round_number: int
) -> Path:
    """Download the aggregate to `dest_dir/<aggregation_id>.npz`; an intact copy already there is kept."""
    logger = get_run_logger()
    target = Path(dest_dir) / f"{check_file_id(aggregation_id)}.npz"
    if target.exists():
        try:
            inspect_aggregate(target)
            logger.info("round %d: aggregate %s already downloaded", round_number, aggregation_id)
            return target
        except ArchiveError:
            target.unlink()
    return session.client.download(aggregation_id, dest_dir)
