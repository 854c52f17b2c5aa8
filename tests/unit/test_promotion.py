"""The promotion gate: which global model a leaf keeps as best and which one it serves."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from pydantic import ValidationError

from prefect_branchkey.flows.leaf.promotion import (
    BEST_MODEL,
    SERVED_MODEL,
    PromotionSettings,
    metric_dropped,
    promote,
    promotion_policy,
)
from prefect_branchkey.flows.leaf.state import LeafState
from prefect_branchkey.flows.participant import Participant, ParticipantError, ServedModel, TrainResult


class Site(Participant):
    """A participant that records each served-model change."""

    metrics: ClassVar[dict[str, str]] = {"accuracy": "max", "loss": "min"}

    def __init__(self) -> None:
        self.served: list[ServedModel] = []

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        raise AssertionError("never trained here")

    def serve(self, model: Path, served: ServedModel) -> None:
        self.served.append(served)


def finish_round(work_dir: Path, state: LeafState, round_number: int, metrics: dict[str, float]) -> Path:
    """Put the leaf at the end of a round whose aggregate (a distinct file) scored `metrics`."""
    models = work_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    path = models / f"agg-{round_number}.npz"
    np.savez(path, layer_0=np.full(2, round_number, np.float32))
    state.run_number, state.round, state.aggregation_id = 1, round_number, f"agg-{round_number}"
    state.global_model, state.eval_metrics = str(path), dict(metrics)
    return path


def run(site: Site, work_dir: Path, state: LeafState, scores: list[float], **options: object) -> list[Path]:
    policy = promotion_policy(site, PromotionSettings(primary_metric=options.pop("metric", None), **options))
    paths = []
    for number, score in enumerate(scores, start=1):
        paths.append(finish_round(work_dir, state, number, {"accuracy": score, "loss": 1 - score}))
        promote(site, work_dir, state, policy)
    return paths


@pytest.fixture
def state() -> LeafState:
    return LeafState(leaf_id="leaf")


def test_a_better_model_becomes_the_best(tmp_path: Path, state: LeafState) -> None:
    paths = run(Site(), tmp_path, state, [0.5, 0.7], keep_best_model=False, metric_drop_alert=None)
    assert state.best["round"] == 2 and (tmp_path / "models" / BEST_MODEL).samefile(paths[1])


def test_a_worse_model_is_served_but_the_best_is_kept(tmp_path: Path, state: LeafState) -> None:
    paths = run(Site(), tmp_path, state, [0.7, 0.5], keep_best_model=False, metric_drop_alert=None)
    assert (tmp_path / "models" / BEST_MODEL).samefile(paths[0])
    assert (tmp_path / "models" / SERVED_MODEL).samefile(paths[1])
    assert state.model_facts["served"] is True and state.model_facts["metric_drop"] == pytest.approx(0.2)


def test_keep_best_model_never_serves_a_worse_model(tmp_path: Path, state: LeafState) -> None:
    paths = run(Site(), tmp_path, state, [0.7, 0.5], keep_best_model=True, metric_drop_alert=None)
    assert (tmp_path / "models" / SERVED_MODEL).samefile(paths[0])
    assert state.model_facts["served"] is False and state.model_facts["best_round"] == 1


def test_lower_is_better_for_a_metric_declared_min(tmp_path: Path, state: LeafState) -> None:
    run(Site(), tmp_path, state, [0.5, 0.7, 0.6], metric="loss", keep_best_model=False, metric_drop_alert=None)
    assert state.best["round"] == 2 and state.best["value"] == pytest.approx(0.3)


def test_the_participant_hears_of_each_change_of_the_served_model(tmp_path: Path, state: LeafState) -> None:
    site = Site()
    run(site, tmp_path, state, [0.5, 0.4, 0.9], keep_best_model=True, metric_drop_alert=None)
    assert [(s.round, s.best) for s in site.served] == [(1, True), (3, True)]


def test_a_promotion_redone_after_a_crash_ends_the_same(tmp_path: Path, state: LeafState) -> None:
    site = Site()
    policy = promotion_policy(site)
    run(site, tmp_path, state, [0.5], keep_best_model=False, metric_drop_alert=None)
    path = finish_round(tmp_path, state, 2, {"accuracy": 0.7, "loss": 0.3})
    saved = copy.deepcopy(state)
    promote(site, tmp_path, state, policy)
    promote(site, tmp_path, saved, policy)
    assert saved.model_facts == state.model_facts and saved.best == state.best
    assert (tmp_path / "models" / BEST_MODEL).samefile(path) and (tmp_path / "models" / SERVED_MODEL).samefile(path)


def test_a_primary_metric_the_participant_does_not_declare_is_refused() -> None:
    with pytest.raises(ParticipantError, match=r"metric 'f1' is not one the participant declares \(accuracy, loss\)"):
        promotion_policy(Site(), PromotionSettings(primary_metric="f1"))


def test_a_negative_metric_drop_alert_is_refused() -> None:
    with pytest.raises(ValidationError, match="metric_drop_alert"):
        PromotionSettings(metric_drop_alert=-0.1)


def test_a_drop_raises_the_alert_only_beyond_its_threshold() -> None:
    assert metric_dropped({"metric_drop": 0.06, "metric_drop_alert": 0.05})
    assert not metric_dropped({"metric_drop": 0.05, "metric_drop_alert": 0.05})
    assert not metric_dropped({"metric_drop": 0.5, "metric_drop_alert": None})
