"""One retrying Prefect task per platform step (retry policy: `tasks.retries`), each taking the
leaf's `LeafSession` (`tasks.session`): its client, and the mark of the round being uploaded."""

from .aggregation import wait_for_aggregation
from .download import download_aggregate
from .loggers import run_logger
from .metrics import round_metrics_key, send_metrics
from .retries import retry_only_transient
from .run import current_run, wait_for_run
from .session import FROM_ENVIRONMENT, LeafSession, resolve_credentials
from .statistics import download_statistics, upload_statistics, wait_for_statistics
from .upload import UploadReceipt, upload_weights

__all__ = [
    "FROM_ENVIRONMENT",
    "LeafSession",
    "UploadReceipt",
    "current_run",
    "download_aggregate",
    "download_statistics",
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
