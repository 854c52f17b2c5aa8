"""Federated training for one leaf: rounds until a round count, a target metric, or a stop.

The round counter and the global model live in the work directory, so one long flow
run and a schedule of one-round flow runs reach the same place.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import State

from bk_blocks import BranchKeyCredentials
from tasks import close_shared_client, resolve_credentials, shared_client

from .observability import label_flow_run, run_tags
from .participant import participant_for
from .round import RoundResult, cancelled_as_busy, federated_round, round_name
from .state import LeafBusyError, hold_work_dir, load_state, resolve_work_dir


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
    rounds: int | None = 10,
    participant_options: dict[str, Any] | None = None,
    target_metric: str | None = None,
    target_value: float | None = None,
    aggregation_timeout_s: float = 3600,
    run_timeout_s: float = 6 * 3600,
    rounds_per_run: int | None = None,
    run_poll_s: float = 10,
) -> list[RoundResult] | State:
    """Run this leaf's rounds, each a `federated-round` subflow run, until one of:
    round `rounds` is done (counted in the work dir across flow runs; None: no limit),
    `rounds_per_run` rounds completed in this flow run (a nightly retraining), the
    evaluation metric `target_metric` reached `target_value` (higher is better), or
    the platform stopped the run. Ends Cancelled if another run of the leaf holds the work dir.
    """
    block = resolve_credentials(credentials)
    directory = resolve_work_dir(work_dir)
    participant_for(block.leaf_id, participant, participant_options)
    label_flow_run(f"{block.leaf_name}-training", run_tags(block))
    round_options = {"participant": participant, "work_dir": str(directory), "participant_options": participant_options,
                     "aggregation_timeout_s": aggregation_timeout_s, "run_timeout_s": run_timeout_s}
    try:
        with hold_work_dir(directory):
            shared_client(block)
            try:
                return _train(block, directory, round_options, rounds, rounds_per_run, target_metric, target_value,
                              run_poll_s)
            finally:
                close_shared_client(block)
    except LeafBusyError as exc:
        return cancelled_as_busy(exc)


def _train(block: BranchKeyCredentials, directory: Path, round_options: dict[str, Any], rounds: int | None,
           rounds_per_run: int | None, target_metric: str | None, target_value: float | None,
           run_poll_s: float) -> list[RoundResult]:
    """The training loop: one `federated-round` subflow per round, with a progress artifact.

    The round subflows run without heartbeats of their own: this run's heartbeat already
    tells the server the process is alive, and Prefect joins a run's heartbeat thread at its
    end in 1 s steps, which cost every round about a second.
    """
    logger = get_run_logger()
    results: list[RoundResult] = []
    first = load_state(directory, block.leaf_id).round
    goal = _goal(first, rounds, rounds_per_run)
    progress = create_progress_artifact(progress=0.0, description=f"{block.leaf_name}: rounds {first}..{goal}")
    while _more_rounds(next_round := load_state(directory, block.leaf_id).round, rounds, results, rounds_per_run):
        with tags(*run_tags(block)), temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            result = federated_round.with_options(flow_run_name=round_name(block, next_round))(block, **round_options)
        results.append(result)
        if result.status == "stopped":
            logger.info("the platform stopped the run; ending at round %d", result.round)
            break
        if result.status == "declined":
            time.sleep(run_poll_s)
            continue
        done = sum(r.status == "completed" for r in results)
        update_progress_artifact(progress, progress=100.0 * done / max(1, goal - first + 1))
        if target_reached(result, target_metric, target_value):
            logger.info("%s reached %s >= %s in round %d", block.leaf_name, target_metric, target_value,
                        result.round)
            break
    update_progress_artifact(progress, progress=100.0)
    return results


def _goal(first: int, rounds: int | None, rounds_per_run: int | None) -> int:
    """The last round this flow run means to reach (for its progress bar)."""
    candidates = [n for n in (rounds, first + rounds_per_run - 1 if rounds_per_run else None) if n is not None]
    return min(candidates) if candidates else first


def _more_rounds(next_round: int, rounds: int | None, results: list[RoundResult], rounds_per_run: int | None) -> bool:
    if rounds is not None and next_round > rounds:
        return False
    return rounds_per_run is None or sum(r.status == "completed" for r in results) < rounds_per_run
