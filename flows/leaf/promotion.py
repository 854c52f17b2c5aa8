"""Which global model a leaf keeps as its best, and which one the site serves.

After each completed round the leaf judges the new global model by the primary metric of its
own evaluation. A better one than the best so far is kept as `models/best.npz`. The served
model, `models/serving.npz` (what the site's application loads; the participant's `serve()`
hears of each change), follows the latest global model, or with `keep_best_model` only ever
the best: a worse aggregate never replaces it. Both files are hard links to the downloaded
aggregate, replaced atomically, so no round copies a model and a crash leaves the old file
whole. The verdict goes into the round's history row: the best round, the drop from the best,
and whether this round's model is now served.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from prefect_branchkey.bk_blocks.files import atomic_write
from prefect_branchkey.flows.leaf.state import LeafState
from prefect_branchkey.flows.participant import Participant, ParticipantError, ServedModel

BEST_MODEL = "best.npz"
SERVED_MODEL = "serving.npz"
COPY_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class MetricGoal:
    """The metric a leaf's global models are judged by, and whether higher or lower is better."""

    name: str
    direction: str = "max"

    def drop(self, value: float, best: float) -> float:
        """How much worse `value` is than `best` (negative when it is better)."""
        return best - value if self.direction == "max" else value - best


class PromotionSettings(BaseModel):
    """Which global model the site serves (a flow parameter, one group in the UI). A misspelt
    field is refused, naming it."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Promotion")

    primary_metric: str | None = Field(
        None, description="The evaluation metric that judges each global model; None: accuracy if the participant "
                          "declares it, else its first declared metric.")
    keep_best_model: bool = Field(False, description="Never serve a worse global model than the best so far.")
    metric_drop_alert: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        None, description="A drop from the best beyond this raises branchkey.metric.dropped; None: never.")


@dataclass(frozen=True)
class PromotionPolicy:
    """A deployment's promotion settings: the metric goal, whether only the best model is served,
    and the drop from the best that raises a `branchkey.metric.dropped` event (None: never)."""

    goal: MetricGoal
    keep_best_model: bool = False
    metric_drop_alert: float | None = None


def metric_goal(participant: Participant | type[Participant], primary_metric: str | None) -> MetricGoal:
    """The goal for `primary_metric` (default: accuracy if declared or nothing is, else the first
    declared metric) of a participant or its class; a name the participant does not declare is
    refused, naming the ones it does."""
    declared = participant.metrics
    if primary_metric is None:
        primary_metric = "accuracy" if "accuracy" in declared or not declared else next(iter(declared))
    if declared and primary_metric not in declared:
        raise ParticipantError(f"metric {primary_metric!r} is not one the participant declares "
                               f"({', '.join(sorted(declared))})")
    return MetricGoal(primary_metric, declared.get(primary_metric, "max"))


def promotion_policy(participant: Participant | type[Participant],
                     settings: PromotionSettings | None = None) -> PromotionPolicy:
    """The `promotion` parameter as a policy for this participant: its metric goal resolved."""
    settings = settings or PromotionSettings()
    return PromotionPolicy(metric_goal(participant, settings.primary_metric), settings.keep_best_model,
                           settings.metric_drop_alert)


def promote(participant: Participant, work_dir: Path, state: LeafState, policy: PromotionPolicy) -> None:
    """Judge the round's global model (in `state`), keep it as best if it is, switch the served
    model when the policy says so, and note the verdict in `state.model_facts`. Safe to repeat
    after a crash: the same model is judged the same way."""
    model = Path(state.global_model or "")
    value = state.eval_metrics.get(policy.goal.name)
    here = {"run_number": state.run_number, "round": state.round, "aggregation_id": state.aggregation_id or "",
            "metric": policy.goal.name, "value": value}
    best = best_of(state, policy.goal)
    drop = policy.goal.drop(value, best["value"]) if best is not None and value is not None else None
    is_best = value is not None and (best is None or (drop is not None and drop < 0) or _same_model(best, here))
    if is_best:
        _link(model, work_dir / "models" / BEST_MODEL)
        state.best = best = here
    served = is_best or not policy.keep_best_model or best is None
    if served and not _same_model(state.serving, here):
        _link(model, work_dir / "models" / SERVED_MODEL)
        state.serving = here
        participant.serve(work_dir / "models" / SERVED_MODEL, _served_model(here, is_best))
    state.model_facts = {**verdict(policy.goal, best, value), "metric_drop_alert": policy.metric_drop_alert,
                         "served": _same_model(state.serving, here)}


def best_of(state: LeafState, goal: MetricGoal) -> dict[str, Any] | None:
    """The leaf's best model so far by this goal's metric (None: none judged by it yet)."""
    return state.best if state.best and state.best.get("metric") == goal.name else None


def verdict(goal: MetricGoal, best: dict[str, Any] | None, value: float | None) -> dict[str, Any]:
    """A history row's judgement of a model scoring `value`: the metric, the best model (after this
    one counted) and how far below it this one is (0 when it is the best, None without a value)."""
    drop = goal.drop(value, best["value"]) if best is not None and value is not None else None
    return {"primary_metric": goal.name, "best_run_number": best["run_number"] if best else None,
            "best_round": best["round"] if best else None, "best_value": best["value"] if best else None,
            "metric_drop": max(drop, 0.0) if drop is not None else None}


def metric_dropped(row: dict[str, Any]) -> bool:
    """Whether a history row's global model fell further below the leaf's best than its alert allows."""
    drop, limit = row.get("metric_drop"), row.get("metric_drop_alert")
    return drop is not None and limit is not None and drop > limit


def _same_model(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    return a is not None and (a["run_number"], a["round"], a["aggregation_id"]) == (
        b["run_number"], b["round"], b["aggregation_id"])


def _served_model(entry: dict[str, Any], best: bool) -> ServedModel:
    return ServedModel(entry["run_number"], entry["round"], entry["aggregation_id"], entry["metric"],
                       entry["value"], best)


def _link(source: Path, target: Path) -> None:
    """Make `target` the same file as `source`, atomically (a copy where links are not possible)."""
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        _copy(source, target)
        return
    os.replace(temporary, target)


def _copy(source: Path, target: Path) -> None:
    """Copy `source` over `target` through `atomic_write`: a disk without room for the copy raises
    `DiskFullError` (naming `target` and the model's size) and leaves the old `target` whole."""
    with open(source, "rb") as model, atomic_write(target, size=source.stat().st_size) as handle:
        shutil.copyfileobj(model, handle, COPY_BLOCK_BYTES)
