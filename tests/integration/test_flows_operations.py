"""Operating a leaf: drift checks without training, the metric-drop event, the branch's name, and
how much of its past the work dir keeps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from prefect_branchkey.flows.evaluation import federated_evaluation
from prefect_branchkey.flows.leaf.history import history_rows
from prefect_branchkey.flows.leaf.promotion import BEST_MODEL, SERVED_MODEL, PromotionSettings
from prefect_branchkey.flows.leaf.retention import RetentionSettings
from prefect_branchkey.flows.participant import Participant, TrainResult
from prefect_branchkey.flows.publishing.observability import artifact_key
from prefect_branchkey.flows.training import federated_training
from prefect_branchkey.tasks import LeafSession

from ..support.bkserver import BkServer, credentials_for
from ..support.faulty_proxy import FaultyProxy
from ..support.flow_helpers import artifacts, events

DIGITS = "prefect_branchkey.flows.examples.digits:DigitsSoftmax"
ONE_LEAF = {"leaf_index": 0, "leaves": 1}


@pytest.fixture(autouse=True)
def _prefect(prefect_api: str) -> None:
    """Every flow here runs against the session's Prefect server."""


class Fading(Participant):
    """A site whose global model scores worse every round after the first."""

    metrics: ClassVar[dict[str, str]] = {"accuracy": "max"}

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        return TrainResult(1.0, [np.full(4, round_number, np.float32)])

    def evaluate(self, global_model: list[np.ndarray], round_number: int) -> dict[str, float]:
        return {"accuracy": 0.9 - 0.1 * (round_number - 1)}


class Broken(Participant):
    """A site whose training fails."""

    def train(self, global_model: list[np.ndarray] | None, round_number: int) -> TrainResult:
        raise RuntimeError("the GPU fell off the bus")


def test_a_round_whose_training_fails_emits_a_failed_round_event(server: BkServer, tmp_path: Path,
                                                                 prefect_api: str) -> None:
    federation = server.federation(leaves=1)
    credentials = credentials_for(server, federation.leaves[0])
    with pytest.raises(RuntimeError, match="fell off the bus"):
        federated_training(credentials, f"{__name__}:Broken", str(tmp_path / "leaf"), rounds=1)
    found = events(prefect_api, "branchkey.round.failed", f"branchkey.leaf.{credentials.leaf_id}", 1)
    assert len(found) == 1 and "RuntimeError: the GPU fell off the bus" in found[0]["payload"]["error"]


def test_a_drift_check_records_an_evaluation_and_uploads_nothing(server: BkServer, tmp_path: Path,
                                                                 prefect_api: str) -> None:
    federation = server.federation(leaves=1, branch="drift")
    credentials = credentials_for(server, federation.leaves[0])
    work_dir = tmp_path / "leaf"
    federated_training(credentials, DIGITS, str(work_dir), rounds=2, participant_options=ONE_LEAF)
    uploads_before = sum(r["updates"] for r in server.status(federation.branch_id)["rounds"])
    record = federated_evaluation(credentials, DIGITS, str(work_dir), participant_options=ONE_LEAF)
    assert sum(r["updates"] for r in server.status(federation.branch_id)["rounds"]) == uploads_before
    rows = history_rows(work_dir)
    assert [r["status"] for r in rows] == ["completed", "completed", "evaluated"]
    assert rows[-1]["round"] == 2 and rows[-1]["eval_metrics"] == record.eval_metrics
    summary = artifacts(prefect_api, artifact_key("summary", credentials.leaf_name))[0]["data"]
    assert "**Drift check**" in summary and "the served model of round 2" in summary


def test_a_drift_check_of_an_older_best_model_is_published(server: BkServer, tmp_path: Path,
                                                            prefect_api: str) -> None:
    federation = server.federation(leaves=1)
    credentials = credentials_for(server, federation.leaves[0])
    work_dir = tmp_path / "leaf"
    federated_training(credentials, f"{__name__}:Fading", str(work_dir), rounds=3,
                       promotion=PromotionSettings(keep_best_model=True))
    record = federated_evaluation(credentials, f"{__name__}:Fading", str(work_dir))
    assert record.round == 1, "the served model is round 1's, the best"
    found = events(prefect_api, "branchkey.round.evaluated", f"branchkey.leaf.{credentials.leaf_id}", 1)
    assert [e["payload"]["round"] for e in found] == [1]


def test_a_drift_check_before_any_round_records_nothing(server: BkServer, tmp_path: Path) -> None:
    federation = server.federation(leaves=1)
    credentials = credentials_for(server, federation.leaves[0])
    assert federated_evaluation(credentials, DIGITS, str(tmp_path / "leaf"), participant_options=ONE_LEAF) is None
    assert history_rows(tmp_path / "leaf") == []


def test_a_model_worse_than_the_best_beyond_the_alert_raises_an_event(server: BkServer, tmp_path: Path,
                                                                      prefect_api: str) -> None:
    federation = server.federation(leaves=1)
    credentials = credentials_for(server, federation.leaves[0])
    federated_training(credentials, f"{__name__}:Fading", str(tmp_path / "leaf"), rounds=3,
                       promotion=PromotionSettings(metric_drop_alert=0.15))
    found = events(prefect_api, "branchkey.metric.dropped", f"branchkey.leaf.{credentials.leaf_id}", 1)
    assert [(e["payload"]["round"], e["payload"]["best_round"]) for e in found] == [(3, 1)]
    assert found[0]["resource"]["branchkey.metric"] == "accuracy"
    assert found[0]["payload"]["drop"] == pytest.approx(0.2)


def test_the_branch_is_named_by_its_id_when_the_platform_cannot_say(
        server: BkServer, open_session: Callable[..., LeafSession]) -> None:
    federation = server.federation(leaves=1, branch="named")
    proxy = FaultyProxy(server.url)
    try:
        proxy.inject("503", "/config/branch/", times=50)
        session = open_session(credentials_for(server, federation.leaves[0], host=proxy.url))
        assert session.branch_name == federation.branch_id
        calls = proxy.count("GET", "/config/branch/")
        assert session.branch_name == federation.branch_id
        assert calls >= 1 and proxy.count("GET", "/config/branch/") == calls, "asked once per session"
    finally:
        proxy.close()


def test_the_branch_is_named_as_the_platform_names_it(server: BkServer,
                                                      open_session: Callable[..., LeafSession]) -> None:
    federation = server.federation(leaves=1, branch="cardiology-sites")
    assert open_session(credentials_for(server, federation.leaves[0])).branch_name == "cardiology-sites"


def test_training_keeps_only_the_latest_updates_and_models_with_every_round_in_the_history(
        server: BkServer, tmp_path: Path) -> None:
    federation = server.federation(leaves=1)
    work_dir = tmp_path / "leaf"
    federated_training(credentials_for(server, federation.leaves[0]), DIGITS, str(work_dir), rounds=4,
                       participant_options=ONE_LEAF, retention=RetentionSettings(keep_updates=2, keep_models=2))
    assert sorted(p.name for p in (work_dir / "updates").iterdir()) == ["run1-round3.npz", "run1-round4.npz"]
    downloads = [p for p in (work_dir / "models").glob("*.npz") if p.name not in (BEST_MODEL, SERVED_MODEL)]
    assert 2 <= len(downloads) <= 3, "the latest two, and the one the best model is linked from"
    assert (work_dir / "models" / SERVED_MODEL).exists() and (work_dir / "models" / BEST_MODEL).exists()
    assert [(row["round"], row["status"]) for row in history_rows(work_dir)] == [(n, "completed") for n in range(1, 5)]
