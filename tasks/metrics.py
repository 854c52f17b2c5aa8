"""The metrics tasks: a round's train or test metrics to the platform, or both in one task run."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from bk_blocks import BranchKeyCredentials
from bk_blocks.protocol import MetricsMode

from .clients import shared_client
from .retries import RETRY_OPTIONS


@task(name="send_metrics", task_run_name="send-{mode}-metrics-round-{round_number}", cache_policy=NO_CACHE,
      **RETRY_OPTIONS)
def send_metrics(
    credentials: BranchKeyCredentials | str,
    aggregation_id: str,
    metrics: dict[str, Any],
    round_number: int,
    mode: MetricsMode = "test",
) -> None:
    """Report metrics for the round's aggregation (`test`, `train` or `non-federated`)."""
    shared_client(credentials, get_run_logger()).send_metrics(aggregation_id, metrics, mode)


@task(name="send_round_metrics", task_run_name="send-metrics-round-{round_number}", cache_policy=NO_CACHE,
      **RETRY_OPTIONS)
def send_round_metrics(
    credentials: BranchKeyCredentials | str,
    aggregation_id: str,
    train: dict[str, Any],
    test: dict[str, Any],
    round_number: int,
) -> None:
    """Report a round's train and test metrics (each only when not empty): one task run, not two,
    since every task run costs the Prefect server three state events."""
    client = shared_client(credentials, get_run_logger())
    for mode, metrics in (("train", train), ("test", test)):
        if metrics:
            client.send_metrics(aggregation_id, metrics, mode)
