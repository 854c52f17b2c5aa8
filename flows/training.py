"""Federated training for one leaf: rounds until a round count, a target metric, or a stop.

The round counter and the global model live in the work directory, so one long flow
run and a schedule of one-round flow runs reach the same place.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from bk_blocks import BranchKeyCredentials
from tasks import close_shared_client, resolve_credentials

from .participant import load_participant
from .round import RoundResult, Timeouts, run_round
from .state import load_state


def target_reached(result: RoundResult, target_metric: str | None, target_value: float | None) -> bool:
    """Whether the round's evaluation met the target (higher is better)."""
    if target_metric is None or target_value is None:
        return False
    value = result.eval_metrics.get(target_metric)
    return value is not None and value >= target_value


@flow(name="federated-training")
def federated_training(
    credentials: BranchKeyCredentials | str,
    participant: str,
    work_dir: str,
    rounds: int = 10,
    participant_options: dict[str, Any] | None = None,
    target_metric: str | None = None,
    target_value: float | None = None,
    aggregation_timeout_s: float = 3600,
    run_timeout_s: float = 6 * 3600,
) -> list[RoundResult]:
    """Run this leaf's rounds up to round `rounds` (counted in the work dir across flow runs).

    Stops early when `target_metric` (an evaluation metric, higher is better) reaches
    `target_value`, or when the platform stops the run.
    """
    logger = get_run_logger()
    block = resolve_credentials(credentials)
    model = load_participant(participant, participant_options)
    timeouts = Timeouts(run_s=run_timeout_s, aggregation_s=aggregation_timeout_s)
    first = load_state(Path(work_dir), block.leaf_id).round
    progress = create_progress_artifact(progress=0.0, description=f"{block.leaf_name}: rounds {first}..{rounds}")
    results: list[RoundResult] = []
    try:
        while load_state(Path(work_dir), block.leaf_id).round <= rounds:
            result = run_round(block, model, Path(work_dir), timeouts)
            results.append(result)
            if result.status == "stopped":
                logger.info("the platform stopped the run; ending at round %d", result.round)
                break
            if result.status == "declined":
                time.sleep(timeouts.run_poll_s)
                continue
            done = result.round - first + 1
            update_progress_artifact(progress, progress=100.0 * done / max(1, rounds - first + 1))
            if target_reached(result, target_metric, target_value):
                logger.info("%s reached %s >= %s in round %d", block.leaf_name, target_metric, target_value,
                            result.round)
                break
    finally:
        close_shared_client(block)
    update_progress_artifact(progress, progress=100.0)
    return results
