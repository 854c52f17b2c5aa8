"""One retrying Prefect task per platform step (retry policy: `tasks.retries`)."""

from .aggregation import wait_for_aggregation
from .clients import (
    close_shared_client,
    close_shared_clients,
    has_shared_client,
    resolve_credentials,
    shared_client,
)
from .download import download_aggregate
from .loggers import run_logger
from .metrics import round_metrics_key, send_metrics
from .retries import retry_only_transient
from .run import current_run, wait_for_run
from .upload import UploadReceipt, upload_weights

__all__ = [
    "UploadReceipt",
    "close_shared_client",
    "close_shared_clients",
    "current_run",
    "download_aggregate",
    "has_shared_client",
    "resolve_credentials",
    "retry_only_transient",
    "round_metrics_key",
    "run_logger",
    "send_metrics",
    "shared_client",
    "upload_weights",
    "wait_for_aggregation",
    "wait_for_run",
]
