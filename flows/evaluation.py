"""A drift check: evaluate the model the site serves on the site's current data, on a schedule,
without training or uploading anything.

The model is the served one (`prefect_branchkey.flows.leaf.promotion`), else the latest global model the leaf holds.
Each check is an `evaluated` row in the leaf's history (beside the rounds, never replacing
one), a new version of the leaf's artifacts whose summary shows the check against the value
the model had when its round ended, and a `branchkey.round.evaluated` event.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, tags
from prefect.runtime import flow_run
from prefect.states import State

from prefect_branchkey.bk_blocks import BranchKeyCredentials
from prefect_branchkey.flows.leaf.history import (
    RoundRecord,
    append_record,
    file_round,
    history_files,
    history_rows,
    utc_from_timestamp,
)
from prefect_branchkey.flows.leaf.promotion import SERVED_MODEL, MetricGoal, PromotionSettings, best_of, verdict
from prefect_branchkey.flows.leaf.setup import leaf_setup
from prefect_branchkey.flows.leaf.state import LeafBusyError, LeafState, cancelled_as_busy, hold_work_dir, load_state
from prefect_branchkey.flows.participant import Participant
from prefect_branchkey.flows.publishing.observability import label_flow_run, run_tags
from prefect_branchkey.flows.publishing.publication import publishing
from prefect_branchkey.flows.updates.transforms import load_global_model
from prefect_branchkey.tasks import LeafSession, run_logger

EVALUATED = "evaluated"


def evaluated_model(work_dir: Path, state: LeafState) -> tuple[Path, dict[str, Any]] | None:
    """The served model's file and its (run_number, round, aggregation_id, value) entry; the
    latest global model with the latest completed round's entry when nothing is served yet; None
    when the leaf has no model."""
    served = work_dir / "models" / SERVED_MODEL
    if state.serving and served.exists():
        return served, state.serving
    completed = [r for r in history_rows(work_dir) if r["status"] == "completed"]
    if not state.global_model or not completed:
        return None
    row = completed[-1]
    return Path(state.global_model), {"run_number": row["run_number"], "round": row["round"],
                                      "aggregation_id": row["aggregation_id"], "value": None}


def evaluate_served(participant: Participant, credentials: BranchKeyCredentials, work_dir: Path,
                    goal: MetricGoal, metric_drop_alert: float | None = None,
                    branch_name: str | None = None) -> RoundRecord | None:
    """Evaluate the leaf's served model and record the check as an `evaluated` history row;
    None (nothing recorded) when the leaf has no model yet."""
    state = load_state(work_dir, credentials.leaf_id)
    found = evaluated_model(work_dir, state)
    if found is None:
        run_logger(__name__).warning("%s has no global model yet: nothing to evaluate until it completes a round",
                                     credentials.leaf_name)
        return None
    path, entry = found
    started = time.time()
    metrics = participant.evaluate(load_global_model(participant, path, state.model_dtypes), entry["round"])
    record = RoundRecord(
        branch_id=credentials.branch_id, leaf_id=credentials.leaf_id, leaf_name=credentials.leaf_name,
        run_number=entry["run_number"], round=entry["round"], status=EVALUATED,
        aggregation_id=entry["aggregation_id"], eval_metrics=dict(metrics), evaluate_s=time.time() - started,
        started_at=utc_from_timestamp(started), finished_at=utc_from_timestamp(time.time()),
        flow_run_id=flow_run.get_id(), tree_id=credentials.tree_id, branch_name=branch_name,
        metric_drop_alert=metric_drop_alert, served=True,
        **verdict(goal, best_of(state, goal), metrics.get(goal.name)))
    files = history_files(work_dir)
    append_record(work_dir, record, filed_under=file_round(files[-1]) if files else None)
    return record


@flow(name="federated-evaluation")
def federated_evaluation(
    credentials: BranchKeyCredentials | str,
    participant: str,
    work_dir: str,
    participant_options: dict[str, Any] | None = None,
    promotion: PromotionSettings = PromotionSettings(),  # noqa: B008 -- a frozen pydantic model, safe to share
) -> RoundRecord | State | None:
    """Evaluate the model this leaf serves on its current data (a drift check), training and
    uploading nothing; recorded in the leaf's history and summary as an evaluation. A primary
    metric more than `promotion.metric_drop_alert` below the leaf's best raises `branchkey.metric.dropped`,
    as a round's does. Ends Cancelled if a round of the leaf holds its work dir (the next check
    runs after it)."""
    leaf = leaf_setup(credentials, work_dir, participant, participant_options, promotion)
    block, directory, model, goal = leaf.credentials, leaf.work_dir, leaf.participant, leaf.promotion.goal
    with LeafSession(block) as session, tags(*run_tags(block, session.branch_name)):
        label_flow_run(f"{block.leaf_name}-evaluation", run_tags(block, session.branch_name))
        try:
            with hold_work_dir(directory), publishing(block.leaf_name, directory) as publication:
                record = evaluate_served(model, block, directory, goal, promotion.metric_drop_alert,
                                         session.branch_name)
                publication.notify()
                return record
        except LeafBusyError as exc:
            return cancelled_as_busy(exc)
