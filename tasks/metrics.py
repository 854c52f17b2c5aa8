"""The metrics task: a round's train or test metrics to the platform."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from prefect_branchkey.bk_blocks.protocol import MetricsMode
from prefect_branchkey.tasks.retries import RETRY_OPTIONS
from prefect_branchkey.tasks.session import LeafSession


@task(name="send_metrics", task_run_name="send-{mode}-metrics-round-{round_number}", cache_policy=NO_CACHE,
      **RETRY_OPTIONS)
def send_metrics(
    session: LeafSession,
    aggregation_id: str,
    metrics: dict[str, Any],
    round_number: int,
    mode: MetricsMode = "test",
    idempotency_key: str | None = None,
) -> None:
    """Report metrics for the round's aggregation (`test`, `train` or `non-federated`).

    With an `idempotency_key` (the round flow passes `round_metrics_key(...)`), a retry or a
    rerun after the process died before recording the send is stored once.
    """
    session.client.send_metrics(aggregation_id, metrics, mode, idempotency_key=idempotency_key)


def round_metrics_key(leaf_id: str, aggregation_id: str, mode: str) -> str:
    """A round's metrics of one mode: one leaf reports them once per aggregation."""
    return f"{leaf_id}.metrics.{aggregation_id}.{mode}"
