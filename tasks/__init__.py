"""One retrying Prefect task per platform step (retry policy: `prefect_branchkey.tasks.retries`), each taking the
leaf's `LeafSession` (`prefect_branchkey.tasks.session`): its client, and the mark of the round being uploaded."""

from prefect_branchkey.tasks.aggregation import wait_for_aggregation
from prefect_branchkey.tasks.download import download_aggregate
from prefect_branchkey.tasks.loggers import run_logger
from prefect_branchkey.tasks.metrics import round_metrics_key, send_metrics
from prefect_branchkey.tasks.retries import retry_only_transient
from prefect_branchkey.tasks.run import current_run, wait_for_run
from prefect_branchkey.tasks.session import FROM_ENVIRONMENT, LeafSession, resolve_credentials
from prefect_branchkey.tasks.statistics import download_statistics, upload_statistics, wait_for_statistics
from prefect_branchkey.tasks.upload import UploadReceipt, idempotency_key, upload_weights

__all__ = [
    "FROM_ENVIRONMENT",
    "LeafSession",
    "UploadReceipt",
    "current_run",
    "download_aggregate",
    "download_statistics",
    "idempotency_key",
    "resolve_credentials",
    "retry_only_transient",
    "round_metrics_key",
    "run_logger",
    "send_metrics",
    "upload_statistics",
    "upload_weights",
    "wait_for_aggregation",
    "wait_for_run",
    "wait_for_statistics",
]
