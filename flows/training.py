"""Federated training for one leaf: rounds until a round count, a target metric, or a stop.

The round counter and the global model live in the work directory, so one long flow
run and a schedule of one-round flow runs reach the same place.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.states import State

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.flows.leaf.promotion import PromotionPolicy, PromotionSettings
from prefect_branchkey.flows.leaf.retention import RetentionSettings
from prefect_branchkey.flows.leaf.setup import leaf_setup
from prefect_branchkey.flows.leaf.state import LeafBusyError, cancelled_as_busy, hold_work_dir, load_state
from prefect_branchkey.flows.participant import Participant
from prefect_branchkey.flows.publishing.observability import label_flow_run, run_tags
from prefect_branchkey.flows.publishing.publication import Publication, publishing
from prefect_branchkey.flows.publishing.registry import load_registry
from prefect_branchkey.flows.round import RoundResult, Timeouts, run_round
from prefect_branchkey.flows.updates.privacy import PrivacySettings, check_budget_at_start
from prefect_branchkey.flows.updates.transforms import UpdatePolicy, UpdateSettings, update_policy
from prefect_branchkey.tasks import LeafSession


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
    update: UpdateSettings = UpdateSettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
    privacy: PrivacySettings = PrivacySettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
    promotion: PromotionSettings = PromotionSettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
    retention: RetentionSettings = RetentionSettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
    registry: str | None = None,
) -> list[RoundResult] | State:
    """Run this leaf's rounds until one of: round `rounds` is done (counted in the work dir
    across flow runs; None: no limit), `rounds_per_run` rounds completed in this flow run (a
    nightly retraining), the evaluation metric `target_metric` reached `target_value` (higher
    is better), or the platform stopped the run. Ends Cancelled if another run of the leaf
    holds the work dir.

    The rounds run in this flow run, their steps as tasks named by round
    (`upload-round-3`): a subflow run per round cost the Prefect server a dozen API calls
    and the leaf about a second between rounds. A deployment that runs one round per flow
    run uses `federated-round`. `update`, `privacy`, `promotion` and `retention` are the round's
    typed groups of settings (`federated_round`'s); a bad or misspelt value, or a DP budget already spent,
    fails the run before any round, and the run ends at the round that would exceed the budget.
    `registry` names an `MlflowRegistry` Block: each global model the leaf promotes is registered
    there in the background (the `mlflow` extra).
    """
    policy = update_policy(update, privacy)
    registry_settings = load_registry(registry)
    leaf = leaf_setup(credentials, work_dir, participant, participant_options, promotion)
    block, directory = leaf.credentials, leaf.work_dir
    timeouts = Timeouts(run_s=run_timeout_s, aggregation_s=aggregation_timeout_s, run_poll_s=run_poll_s)
    with LeafSession(block) as session, tags(*run_tags(block, session.branch_name)):
        label_flow_run(f"{block.leaf_name}-training", run_tags(block, session.branch_name))
        try:
            with hold_work_dir(directory), publishing(block.leaf_name, directory, registry_settings) as publication:
                check_budget_at_start(policy.privacy, directory, load_state(directory, block.leaf_id).phase != "idle")
                return _round_loop(session, publication, policy, leaf.promotion, retention, leaf.participant,
                                   directory, timeouts, rounds, rounds_per_run, target_metric, target_value)
        except LeafBusyError as exc:
            return cancelled_as_busy(exc)


def _round_loop(session: LeafSession, publication: Publication, policy: UpdatePolicy, promotion: PromotionPolicy,
                retention: RetentionSettings, model: Participant, directory: Path, timeouts: Timeouts,
                rounds: int | None, rounds_per_run: int | None, target_metric: str | None,
                target_value: float | None) -> list[RoundResult]:
    """The training loop: one round after another, with a progress artifact."""
    logger = get_run_logger()
    block = session.credentials
    results: list[RoundResult] = []
    first = load_state(directory, block.leaf_id).round
    goal = _goal(first, rounds, rounds_per_run)
    # create_progress_artifact is sync_compatible, typed for both callers: from sync code it returns the id.
    progress: UUID = create_progress_artifact(  # type: ignore[assignment]
        progress=0.0, description=f"{block.leaf_name}: rounds {first}..{goal}")
    while _more_rounds(load_state(directory, block.leaf_id).round, rounds, results, rounds_per_run):
        result = run_round(session, model, directory, timeouts, publication, policy, promotion, retention)
        results.append(result)
        if result.status == "stopped":
            logger.info("the platform stopped the run; ending at round %d", result.round)
            break
        if result.status == "budget-spent":
            logger.info("the leaf's privacy budget is spent; ending at round %d", result.round)
            break
        if result.status == "declined":
            time.sleep(timeouts.run_poll_s)
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
